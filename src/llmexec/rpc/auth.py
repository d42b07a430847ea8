"""Bearer-token check for the client-facing service.

Clients send `authorization: Bearer <token>` metadata. BearerTokenInterceptor
refuses calls to the protected services without the right token with
UNAUTHENTICATED, before the handler runs. grpc.health.v1 and server reflection
stay open on purpose: Kubernetes' native gRPC probes cannot send metadata, and
reflection reveals only the public schema (grpcurl needs it to build calls).
The token guards what costs or reveals something: generation and server info.

Internal services (loader, runner) are not exposed to clients; mutual TLS and
NetworkPolicies guard them instead.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

import grpc

from llmexec.errors import FailedPreconditionError

AUTHORIZATION = "authorization"


def read_token(token_file: str = "", token: str = "") -> str:
    """The token from a file (a mounted Secret; trailing newline ignored) or given directly; "" when neither."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise FailedPreconditionError(f"cannot read the API token file {token_file!r}: {exc.strerror}") from exc
        if not token:
            raise FailedPreconditionError(f"the API token file {token_file!r} is empty")
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the token: pass as `metadata=` to a stub call."""
    return ((AUTHORIZATION, f"Bearer {token}"),)


def _service_of(method: str) -> str:
    # "/llmexec.v1.SchedulerService/Generate" -> "llmexec.v1.SchedulerService"
    return method.lstrip("/").split("/", 1)[0]


def _refusing_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as `handler` that aborts with UNAUTHENTICATED."""

    async def deny(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises first; the yield makes this a stream handler

    serializers = {"request_deserializer": handler.request_deserializer,
                   "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **serializers)
    return grpc.unary_unary_rpc_method_handler(deny, **serializers)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls to `protected_services` that lack `authorization: Bearer <token>`."""

    def __init__(self, token: str, protected_services: Iterable[str]) -> None:
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._expected = f"Bearer {token}".encode()
        self._protected = frozenset(protected_services)

    def _refusal(self, metadata) -> str:
        sent = [value for key, value in (metadata or ()) if key == AUTHORIZATION]
        if not sent:
            return "missing bearer token: send metadata 'authorization: Bearer <token>'"
        value = sent[0].encode() if isinstance(sent[0], str) else sent[0]
        # Constant time: the comparison must not leak how much of the token matched.
        if not hmac.compare_digest(value, self._expected):
            return "invalid bearer token"
        return ""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or _service_of(handler_call_details.method) not in self._protected:
            return handler
        refusal = self._refusal(handler_call_details.invocation_metadata)
        # The client gets a clean status, before the handler (or the request body) is touched.
        return _refusing_handler(handler, refusal) if refusal else handler
