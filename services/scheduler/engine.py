"""The continuous-batching loop: schedule a step, run it on the runner, stream results.

One asyncio task owns the Scheduler; request handlers only enqueue work and
read their own output queue. Aborts (client cancel or disconnect) are applied
between steps, so blocks are never freed while the runner may still write them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from llmexec.errors import UnavailableError
from llmexec.scheduler.detokenizer import IncrementalDetokenizer
from llmexec.scheduler.scheduler import Scheduler
from llmexec.scheduler.sequence import Sequence
from llmexec.scheduler.state_store import SequenceStore
from llmexec.scheduler.tokenizer import Tokenizer
from llmexec.step import StepInput

log = logging.getLogger(__name__)

ExecuteStep = Callable[[StepInput], Awaitable[list[int]]]


@dataclass
class StreamChunk:
    """What one GenerateResponse carries."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length" or "abort" on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        store: SequenceStore,
        execute_step: ExecuteStep,
        tokenizer: Tokenizer | None,
    ) -> None:
        self.scheduler = scheduler
        self.store = store
        self.execute_step = execute_step
        self.tokenizer = tokenizer
        self._outputs: dict[str, asyncio.Queue] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._pending_aborts: set[str] = set()
        self._work = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llmexec-engine")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def in_flight(self) -> int:
        return len(self._outputs)

    def add(self, seq: Sequence) -> asyncio.Queue:
        """Queue a validated sequence; returns the queue its StreamChunks arrive on."""
        self.scheduler.add(seq)  # validates: raises before anything else is recorded
        queue: asyncio.Queue = asyncio.Queue()
        self._outputs[seq.request_id] = queue
        if self.tokenizer is not None:
            self._detokenizers[seq.request_id] = IncrementalDetokenizer(
                self.tokenizer.decode, seq.prompt_token_ids, stop=tuple(seq.sampling_params.stop)
            )
        try:
            self.store.save(seq)
        except Exception:
            self.scheduler.abort(seq.request_id)
            self._forget(seq.request_id)
            raise
        self._work.set()
        return queue

    def abort(self, request_id: str) -> None:
        """Forget a request whose client went away; takes effect before the next step."""
        if request_id in self._outputs:
            self._pending_aborts.add(request_id)
            self._work.set()

    async def _run(self) -> None:
        while True:
            self._apply_aborts()
            if not self.scheduler.has_unfinished():
                self._work.clear()
                await self._work.wait()
                continue
            scheduled = self.scheduler.schedule()
            if scheduled is None:
                # Nothing fits this step (should not happen with a validated
                # prompt); yield so aborts and new requests can arrive.
                await asyncio.sleep(0.005)
                continue
            try:
                sampled = await self.execute_step(scheduled.step_input)
            except Exception as exc:  # the runner failed: fail this step's requests, keep serving
                log.error("step failed: %s", exc)
                self._fail(scheduled.sequences, exc)
                continue
            touched = self.scheduler.update(scheduled, sampled)
            self._emit(touched)
            # Preempted sequences lost their blocks; Redis must say so too.
            self.store.save_step(touched + scheduled.preempted)

    def _emit(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            queue = self._outputs.get(seq.request_id)
            if queue is None:
                continue
            new_token = seq.output_token_ids[-1:]
            chunk = StreamChunk(token_ids=list(new_token))
            detok = self._detokenizers.get(seq.request_id)
            if detok is not None:
                chunk.text = detok.add(new_token)
                if detok.stopped and not seq.is_finished:
                    self.scheduler.finish(seq.request_id, "stop")
            if seq.is_finished:
                if detok is not None and not detok.stopped:
                    chunk.text += detok.flush()
                chunk.finish_reason = seq.finish_reason
                chunk.prompt_tokens = len(seq.prompt_token_ids)
                chunk.completion_tokens = len(seq.output_token_ids)
                self._forget(seq.request_id)
            queue.put_nowait(chunk)

    def _apply_aborts(self) -> None:
        for request_id in self._pending_aborts:
            seq = self.scheduler.abort(request_id)
            if seq is not None:
                self.store.save_step([seq])
            self._forget(request_id)
        self._pending_aborts.clear()

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        error = UnavailableError(f"the runner failed to execute a step: {exc}")
        for seq in seqs:
            self.scheduler.abort(seq.request_id)
            self.store.save_step([seq])
            queue = self._outputs.get(seq.request_id)
            if queue is not None:
                queue.put_nowait(error)
            self._forget(seq.request_id)

    def _forget(self, request_id: str) -> None:
        self._outputs.pop(request_id, None)
        self._detokenizers.pop(request_id, None)
