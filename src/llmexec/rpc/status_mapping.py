"""The one place where exceptions become gRPC statuses.

Servicers raise llmexec.errors exceptions (or plain ValueError for bad input);
ErrorMappingInterceptor catches them around every RPC, unary or streaming, and
aborts the call with the matching status and the exception's message. Anything
unexpected becomes INTERNAL with its type and message, and is logged with a
traceback, so the server keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from llmexec.errors import LLMExecError

log = logging.getLogger(__name__)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to (status code, message a person can act on)."""
    if isinstance(exc, LLMExecError):
        return grpc.StatusCode[exc.status], str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory: {exc}"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in %s", method)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message)


def _wrap_unary(behavior: Callable, method: str) -> Callable:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the mapping point
            await _abort(context, exc, method)

    return wrapped


def _wrap_stream(behavior: Callable, method: str) -> Callable:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the mapping point
            await _abort(context, exc, method)

    return wrapped


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps unary-unary and unary-stream handlers with status_for()."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
