"""TLS, mutual TLS, the bearer token and the health-only port, on real in-process gRPC servers.

Each server is the loader's real servicer (an empty ModelStore: GetModelInfo
answers NOT_FOUND "no model is loaded yet", which proves the call reached the
handler) started by llmexec.rpc.server.start_server, as the services start it.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import redis
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pki import make_pki

from llmexec.errors import FailedPreconditionError
from llmexec.loader.model_store import ModelStore
from llmexec.loader.server import LoaderServicer
from llmexec.redis_server import EmbeddedRedis
from llmexec.rpc.auth import BearerTokenInterceptor, bearer_metadata
from llmexec.rpc.client import check_health, sync_channel
from llmexec.rpc.probe import main as probe_main
from llmexec.rpc.server import start_server
from llmexec.rpc.tls import ClientTLS, ServerTLS
from llmexec.rpc.transport_args import add_transport_args, transport_from_args
from llmexec.scheduler.redis_connection import connect_redis, redact
from llmexec.v1 import loader_pb2, loader_pb2_grpc

LOADER = "llmexec.v1.LoaderService"
TOKEN = "s3cret-token-for-tests"


class InProcessServer:
    """start_server() on an event loop in a background thread; close() stops both."""

    def __init__(self, **kwargs) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = self._call(self._start(kwargs))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    async def _start(self, kwargs):
        running = await start_server(
            [(loader_pb2_grpc.add_LoaderServiceServicer_to_server, LoaderServicer(ModelStore()))],
            [LOADER], "127.0.0.1", 0, **kwargs,
        )
        await running.set_serving(True)
        return running

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def close(self) -> None:
        self._call(self.running.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def serve():
    servers = []

    def start(**kwargs) -> InProcessServer:
        servers.append(InProcessServer(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def get_model_info(address: str, tls: ClientTLS | None = None, metadata=None) -> grpc.RpcError:
    """Call LoaderService/GetModelInfo; return the RpcError it ends with (an empty store always errs)."""
    with sync_channel(address, tls) as channel, pytest.raises(grpc.RpcError) as err:
        loader_pb2_grpc.LoaderServiceStub(channel).GetModelInfo(
            loader_pb2.GetModelInfoRequest(), timeout=5, metadata=metadata
        )
    return err.value


def reached_handler(err: grpc.RpcError) -> bool:
    return err.code() == grpc.StatusCode.NOT_FOUND and "no model is loaded" in err.details()


def test_tls_server_serves_tls_clients_and_refuses_plaintext(pki, serve):
    server = serve(tls=ServerTLS(str(pki.server.cert), str(pki.server.key)))
    assert reached_handler(get_model_info(server.address, ClientTLS(str(pki.ca.cert_path))))
    assert check_health(server.address, LOADER, tls=ClientTLS(str(pki.ca.cert_path))) == "SERVING"
    # A plaintext client cannot speak to a TLS port: the connection fails before any RPC.
    assert get_model_info(server.address).code() == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA refuses the server's certificate.
    rogue_trust = ClientTLS(str(pki.rogue_client.cert.parent / "rogue-ca.pem"))
    assert get_model_info(server.address, rogue_trust).code() == grpc.StatusCode.UNAVAILABLE


def test_server_name_override_for_addresses_the_certificate_does_not_name(pki, serve):
    # The server certificate names localhost and 127.0.0.1; dial it as "localhost" but check another name.
    server = serve(tls=ServerTLS(str(pki.server.cert), str(pki.server.key)))
    address = f"localhost:{server.running.port}"
    wrong_name = ClientTLS(str(pki.ca.cert_path), server_name="scheduler.example")
    assert get_model_info(address, wrong_name).code() == grpc.StatusCode.UNAVAILABLE
    assert reached_handler(get_model_info(address, ClientTLS(str(pki.ca.cert_path), server_name="localhost")))


def test_mutual_tls_requires_a_client_certificate_from_the_trusted_ca(pki, serve):
    server = serve(tls=ServerTLS(str(pki.server.cert), str(pki.server.key), str(pki.ca.cert_path)))
    ca = str(pki.ca.cert_path)
    served = get_model_info(server.address, ClientTLS(ca, str(pki.client.cert), str(pki.client.key)))
    assert reached_handler(served)
    # Without a client certificate, or with one from a CA the server does not trust, the server
    # aborts the TLS handshake: no HTTP/2 connection exists to carry a gRPC status, so the
    # client reports UNAVAILABLE and the handler never runs. (gRPC's Python API cannot ask for
    # a client certificate without requiring it, so an UNAUTHENTICATED status is not possible here.)
    for tls in (ClientTLS(ca), ClientTLS(ca, str(pki.rogue_client.cert), str(pki.rogue_client.key))):
        err = get_model_info(server.address, tls)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert not reached_handler(err)


def test_bearer_token_guards_the_service_but_not_health_or_reflection(serve):
    server = serve(interceptors=[BearerTokenInterceptor(TOKEN, [LOADER])])
    missing = get_model_info(server.address)
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in missing.details()
    wrong = get_model_info(server.address, metadata=bearer_metadata("not-the-token"))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED and "invalid bearer token" in wrong.details()
    no_scheme = get_model_info(server.address, metadata=(("authorization", TOKEN),))
    assert no_scheme.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reached_handler(get_model_info(server.address, metadata=bearer_metadata(TOKEN)))
    # Probes and grpcurl's reflection need no token.
    assert check_health(server.address, LOADER) == "SERVING"
    with sync_channel(server.address) as channel:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert LOADER in names


def test_token_and_mutual_tls_together(pki, serve):
    server = serve(tls=ServerTLS(str(pki.server.cert), str(pki.server.key), str(pki.ca.cert_path)),
                   interceptors=[BearerTokenInterceptor(TOKEN, [LOADER])])
    tls = ClientTLS(str(pki.ca.cert_path), str(pki.client.cert), str(pki.client.key))
    assert get_model_info(server.address, tls).code() == grpc.StatusCode.UNAUTHENTICATED
    assert reached_handler(get_model_info(server.address, tls, metadata=bearer_metadata(TOKEN)))


def test_health_port_answers_plaintext_probes_and_nothing_else(pki, serve):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        health_port = s.getsockname()[1]
    server = serve(tls=ServerTLS(str(pki.server.cert), str(pki.server.key), str(pki.ca.cert_path)),
                   health_port=health_port)
    probe = f"127.0.0.1:{health_port}"
    # What the kubelet's native gRPC probe does: plaintext, no metadata.
    assert check_health(probe, LOADER) == "SERVING"
    assert check_health(probe) == "SERVING"
    assert probe_main([probe, LOADER]) == 0  # compose's healthcheck command
    assert get_model_info(probe).code() == grpc.StatusCode.UNIMPLEMENTED  # the loader is not on this port
    # Draining flips both ports to NOT_SERVING at once.
    server._call(server.running.set_serving(False))
    assert check_health(probe, LOADER) == "NOT_SERVING"
    assert check_health(probe, "liveness") == "SERVING"  # draining is no reason to restart
    assert probe_main([probe, LOADER]) == 1
    assert check_health(probe, "llmexec.v1.NoSuchService") == "NOT_FOUND"


def test_transport_flags_and_environment(monkeypatch, pki):
    import argparse

    def parse(argv):
        parser = argparse.ArgumentParser()
        add_transport_args(parser, "runner")
        return transport_from_args(parser.parse_args(argv))

    assert parse([]).server_tls is None and parse([]).client_tls is None and parse([]).health_port == 0
    monkeypatch.setenv("LLMEXEC_TLS_CERT", str(pki.server.cert))
    monkeypatch.setenv("LLMEXEC_TLS_KEY", str(pki.server.key))
    monkeypatch.setenv("LLMEXEC_TLS_CLIENT_CA", str(pki.ca.cert_path))
    monkeypatch.setenv("LLMEXEC_TLS_CA", str(pki.ca.cert_path))
    monkeypatch.setenv("LLMEXEC_RUNNER_HEALTH_PORT", "50063")
    t = parse(["--drain-seconds", "30"])
    assert t.server_tls == ServerTLS(str(pki.server.cert), str(pki.server.key), str(pki.ca.cert_path))
    assert t.client_tls == ClientTLS(str(pki.ca.cert_path), str(pki.server.cert), str(pki.server.key))
    assert (t.health_port, t.drain_seconds) == (50063, 30.0)
    with pytest.raises(FailedPreconditionError, match="go together"):
        parse(["--tls-key", ""])
    with pytest.raises(FailedPreconditionError, match="cannot read the TLS key"):
        ServerTLS(str(pki.server.cert), "/nonexistent.key").credentials()


def test_redis_password_is_required_and_used(tmp_path):
    with EmbeddedRedis(password="redis-pass") as server:
        with pytest.raises(FailedPreconditionError, match="requires a password|refused"):
            connect_redis(server.url, wait_seconds=5)
        with pytest.raises(FailedPreconditionError, match="refused"):
            connect_redis(server.url, "wrong", wait_seconds=5)
        client = connect_redis(server.url, "redis-pass")
        client.set("k", "v")
        assert client.get("k") == b"v"
        url_with_password = server.url.replace("redis://", "redis://:redis-pass@")
        assert connect_redis(url_with_password).get("k") == b"v"
        assert "redis-pass" not in redact(url_with_password)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(server.url).get("k")
