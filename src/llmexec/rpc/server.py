"""Start an asyncio gRPC server the way every llmexec service needs it.

Each server gets: the error-mapping interceptor, grpc.health.v1 (overall and
per-service status; NOT_SERVING until the service says it is ready), server
reflection (so grpcurl works without .proto files), raised message size limits
(weight layouts and big batches cross the wire), and graceful shutdown on
SIGTERM/SIGINT: health turns NOT_SERVING, in-flight calls get a grace period.
Optionally: TLS or mutual TLS (llmexec.rpc.tls), extra interceptors (the
bearer-token check), and a plaintext health-only port for Kubernetes' native
gRPC probes, which cannot speak TLS.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from llmexec.rpc.status_mapping import ErrorMappingInterceptor
from llmexec.rpc.tls import ServerTLS

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# A health name that is SERVING for as long as the server answers, whatever the
# services' readiness: liveness probes check it, so a loading or draining
# service is taken out of rotation (readiness) but never restarted for it.
LIVENESS_SERVICE = "liveness"

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    service_names: list[str]
    # The plaintext server that answers only grpc.health.v1 (None: health is on `port` only).
    health_server: grpc.aio.Server | None = None
    health_port: int = 0

    async def stop(self, grace_seconds: float | None) -> None:
        await self.server.stop(grace_seconds)
        if self.health_server is not None:
            await self.health_server.stop(None)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)


async def start_server(
    register: Iterable[tuple[Callable, object]],
    service_full_names: list[str],
    host: str,
    port: int,
    *,
    tls: ServerTLS | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    health_port: int = 0,
) -> RunningServer:
    """Start a server with the given (add_XServicer_to_server, servicer) pairs.

    service_full_names are the proto names ("llmexec.v1.LoaderService") used
    for reflection and per-service health. Returns once the port is bound; the
    health status is NOT_SERVING until set_serving(True). `tls` serves TLS (or
    mutual TLS) instead of plaintext; `interceptors` run before the error
    mapping; `health_port` > 0 also serves grpc.health.v1 alone, in plaintext,
    on that port.
    """
    server = grpc.aio.server(interceptors=[*interceptors, ErrorMappingInterceptor()], options=CHANNEL_OPTIONS)
    for add_to_server, servicer in register:
        add_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection([*service_full_names, health_name, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}; is the port in use?")
    health_server = None
    if health_port:
        # Same HealthServicer object: one set_serving() updates both ports.
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
        # Reflection of Health alone, so `grpcurl -plaintext HOST:HEALTH_PORT grpc.health.v1.Health/Check` works.
        reflection.enable_server_reflection([health_name, reflection.SERVICE_NAME], health_server)
        if health_server.add_insecure_port(f"{host}:{health_port}") == 0:
            raise OSError(f"could not bind the health port {host}:{health_port}; is it in use?")
        await health_server.start()
    await server.start()
    running = RunningServer(server=server, port=bound, health=health, service_names=service_full_names,
                            health_server=health_server, health_port=health_port)
    await running.set_serving(False)
    await health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return running


async def serve_until_signalled(running: RunningServer, grace_seconds: float = 10.0) -> None:
    """Block until SIGTERM/SIGINT, then drain: NOT_SERVING, then stop with a grace period."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server_done = asyncio.ensure_future(running.server.wait_for_termination())
    stop_wait = asyncio.ensure_future(stop.wait())
    await asyncio.wait({server_done, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down (grace %.0fs)", grace_seconds)
    await running.set_serving(False)
    await running.stop(grace_seconds)
    stop_wait.cancel()


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
