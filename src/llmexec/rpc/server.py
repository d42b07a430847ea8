"""Start an asyncio gRPC server the way every llmexec service needs it.

Each server gets: the error-mapping interceptor, grpc.health.v1 (overall and
per-service status; NOT_SERVING until the service says it is ready), server
reflection (so grpcurl works without .proto files), raised message size limits
(weight layouts and big batches cross the wire), and graceful shutdown on
SIGTERM/SIGINT: health turns NOT_SERVING, in-flight calls get a grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from llmexec.rpc.status_mapping import ErrorMappingInterceptor

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

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
) -> RunningServer:
    """Start a server with the given (add_XServicer_to_server, servicer) pairs.

    service_full_names are the proto names ("llmexec.v1.LoaderService") used
    for reflection and per-service health. Returns once the port is bound; the
    health status is NOT_SERVING until set_serving(True).
    """
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=CHANNEL_OPTIONS)
    for add_to_server, servicer in register:
        add_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*service_full_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}; is the port in use?")
    await server.start()
    running = RunningServer(server=server, port=bound, health=health, service_names=service_full_names)
    await running.set_serving(False)
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
    await running.server.stop(grace_seconds)
    stop_wait.cancel()


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
