"""The scheduler's side of one RunnerService: steps in, sampled tokens out.

A runner that cannot be reached, or that answers that it is not the runner
the step was planned for (it restarted) or that it lacks a sequence's token
history, has lost the KV cache the scheduler's block tables describe: those
errors become RunnerLost, and the engine recomputes. Other errors (a step the
runner refuses as invalid) propagate as they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from llmexec.rpc.codec import step_output_from_pb, step_to_pb
from llmexec.step import StepInput, StepOutput
from llmexec.v1 import runner_pb2, runner_pb2_grpc

STEP_TIMEOUT_S = 600.0
LOST_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,  # a connection torn down mid-call
}


class RunnerLost(Exception):
    """The runner went away or restarted; its KV cache must be recomputed."""


class RunnerClient:
    def __init__(self, address: str, channel_factory: Callable[[str], grpc.aio.Channel]):
        self.address = address
        self._channel_factory = channel_factory
        self._channel = channel_factory(address)
        self._stub = runner_pb2_grpc.RunnerServiceStub(self._channel)

    async def info(self, timeout: float = 30.0) -> runner_pb2.GetRunnerInfoResponse:
        return await self._stub.GetRunnerInfo(runner_pb2.GetRunnerInfoRequest(), timeout=timeout)

    async def execute(self, step: StepInput) -> StepOutput:
        return await self.send(step)

    def send(self, step: StepInput) -> asyncio.Future:
        """Start the step's call now (serialized here, on the caller's time) and return the
        future of its StepOutput: the request leaves as soon as the event loop next runs, even
        if the caller then does synchronous work before awaiting it."""
        call = self._stub.ExecuteStep(step_to_pb(step), timeout=STEP_TIMEOUT_S)
        return asyncio.ensure_future(self._reply(call, step))

    async def _reply(self, call, step: StepInput) -> StepOutput:
        try:
            reply = await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() in LOST_CODES:
                raise RunnerLost(f"runner {self.address}: {exc.code().name}: {exc.details()}") from exc
            raise
        return step_output_from_pb(reply, step)

    async def reconnect(self) -> None:
        """A fresh channel: the old one may sit in a long reconnect backoff."""
        await self._channel.close()
        self._channel = self._channel_factory(self.address)
        self._stub = runner_pb2_grpc.RunnerServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()
