"""The exceptions services raise for problems a caller can act on.

Each class names the gRPC status it becomes; llmexec.rpc.status_mapping is the
one place that turns them into gRPC statuses. This module imports no grpc so
pure-Python code (the scheduler core, the loader's readers) can raise them.
"""

from __future__ import annotations


class LLMExecError(Exception):
    """Base class; `status` is the name of a grpc.StatusCode member."""

    status = "INTERNAL"


class InvalidArgumentError(LLMExecError, ValueError):
    status = "INVALID_ARGUMENT"


class NotFoundError(LLMExecError, LookupError):
    status = "NOT_FOUND"


class FailedPreconditionError(LLMExecError):
    status = "FAILED_PRECONDITION"


class ResourceExhaustedError(LLMExecError):
    status = "RESOURCE_EXHAUSTED"


class UnavailableError(LLMExecError):
    status = "UNAVAILABLE"


class CheckpointError(FailedPreconditionError):
    """A checkpoint is corrupt, truncated or does not match its architecture.

    The message names the file and, where known, the tensor.
    """


class UnsupportedArchitectureError(FailedPreconditionError):
    """The checkpoint's architecture is not in the model registry."""
