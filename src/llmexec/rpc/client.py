"""Client-side helpers: channels with our limits (plaintext or TLS), and waiting for SERVING."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmexec.errors import UnavailableError
from llmexec.rpc.server import CHANNEL_OPTIONS
from llmexec.rpc.tls import ClientTLS


def aio_channel(address: str, tls: ClientTLS | None = None) -> grpc.aio.Channel:
    """An asyncio channel; TLS (mutual when `tls` has a client certificate) when `tls` is given."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, tls.credentials(), options=CHANNEL_OPTIONS + tls.channel_options())


def sync_channel(address: str, tls: ClientTLS | None = None) -> grpc.Channel:
    """The blocking twin of aio_channel, for command-line tools."""
    if tls is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, tls.credentials(), options=CHANNEL_OPTIONS + tls.channel_options())


async def wait_until_serving(
    address: str, service: str = "", timeout: float = 300.0, tls: ClientTLS | None = None
) -> None:
    """Poll grpc.health.v1 until `service` at `address` is SERVING.

    Raises UnavailableError after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    async with aio_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                last_error = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(0.2)
    raise UnavailableError(f"{service or 'server'} at {address} not SERVING after {timeout:.0f}s ({last_error})")


def check_health(address: str, service: str = "", timeout: float = 2.0, tls: ClientTLS | None = None) -> str:
    """One synchronous health check: the status name, or the RPC error's code name."""
    with sync_channel(address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
