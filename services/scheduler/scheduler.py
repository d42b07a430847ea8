"""Continuous batching: which tokens of which sequences run in the next step.

Every step mixes the decode token of each running sequence with as many whole
waiting prompts as fit the token budget, max_num_seqs and the free KV blocks.
When a running sequence cannot get a block for its next token, the newest
running sequence is preempted by recompute: its blocks are freed and it goes
back to the front of the waiting queue, to be prefilled again (prompt and the
outputs so far) later.

The caller's loop:
    step = scheduler.schedule()        # None when nothing can run
    sampled = runner.execute(step.step_input)
    for seq in scheduler.update(step, sampled): stream seq's new token
Stop strings are text: the caller detects them and calls finish(id, "stop").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from llmexec.errors import InvalidArgumentError
from llmexec.scheduler.block_manager import BlockManager
from llmexec.scheduler.sequence import FINISHED_STATUS, Sequence, SequenceStatus
from llmexec.step import SequenceInput, StepInput


@dataclass
class ScheduledStep:
    step_input: StepInput
    sequences: list[Sequence]  # in the order of step_input.sequences
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting by this schedule()

    @property
    def num_tokens(self) -> int:
        return self.step_input.num_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 8192,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
    ):
        if max_num_seqs <= 0:
            raise InvalidArgumentError(f"max_num_seqs must be > 0, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            # every running sequence decodes in every step
            raise InvalidArgumentError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs ({max_num_seqs})"
            )
        if max_model_len > block_manager.num_tokens_capacity:
            # otherwise a lone sequence could outgrow the cache and never finish
            raise InvalidArgumentError(
                f"max_model_len {max_model_len} exceeds the KV cache "
                f"({block_manager.num_blocks} blocks x {block_manager.block_size} tokens); "
                "lower max_model_len or give the cache more blocks"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()  # oldest first
        self.seqs: dict[str, Sequence] = {}  # unfinished, by request_id
        self.num_preemptions = 0
        self._finished_by_update: dict[str, Sequence] = {}

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> Sequence | None:
        return self.seqs.get(request_id)

    def add(self, seq: Sequence) -> None:
        """Queue seq (status WAITING, no blocks) behind the other waiting ones."""
        if seq.request_id in self.seqs:
            raise InvalidArgumentError(f"request_id {seq.request_id!r} is already in flight")
        if not seq.prompt_token_ids:
            raise InvalidArgumentError("the prompt must have at least one token")
        if seq.num_tokens >= self.max_model_len:
            raise InvalidArgumentError(
                f"the prompt has {seq.num_tokens} tokens; max_model_len {self.max_model_len} "
                "leaves no room to generate"
            )
        seq.status = SequenceStatus.WAITING
        self.seqs[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request as aborted and free its blocks; None if unknown or finished."""
        return self.finish(request_id, "abort")

    def finish(self, request_id: str, reason: str) -> Sequence | None:
        """Finish a request for `reason` ("stop", "length" or "abort"), freeing its blocks.

        A stop string found in the text of a token whose update() already
        finished the sequence for length turns that finish into "stop", as the
        text-level stop takes precedence. Returns None when the request is unknown
        or already finished otherwise.
        """
        status = FINISHED_STATUS.get(reason)
        if status is None:
            raise InvalidArgumentError(f"finish reason must be one of {sorted(FINISHED_STATUS)}, got {reason!r}")
        seq = self.seqs.get(request_id)
        if seq is None:
            seq = self._finished_by_update.get(request_id)
            if seq is not None and status is SequenceStatus.FINISHED_STOPPED:
                seq.status = status
                return seq
            return None
        self._finish(seq, status)
        if seq in self.waiting:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        return seq

    def schedule(self) -> ScheduledStep | None:
        """The next step: running decodes first, then new prefills; None if nothing fits."""
        decodes, preempted = self._schedule_decodes()
        # Admitting prompts right after a preemption would only thrash.
        prefills = [] if preempted else self._schedule_prefills(num_batched_tokens=len(decodes))
        scheduled = decodes + prefills
        if not scheduled:
            return None
        return ScheduledStep(step_input=self._build_step_input(scheduled), sequences=scheduled, preempted=preempted)

    def update(self, step: ScheduledStep, sampled_token_ids: list[int]) -> list[Sequence]:
        """Append each scheduled sequence's sampled token and apply token-level stops.

        Finished sequences release their blocks. Returns the sequences that got a
        token, finished ones included (see finish_reason); sequences aborted
        while the step ran are skipped.
        """
        if len(sampled_token_ids) != len(step.sequences):
            raise InvalidArgumentError(
                f"got {len(sampled_token_ids)} sampled tokens for {len(step.sequences)} scheduled sequences"
            )
        self._finished_by_update = {}
        touched = []
        for seq, token_id in zip(step.sequences, sampled_token_ids):
            if seq.is_finished:
                continue
            seq.num_computed_tokens = seq.num_tokens  # the step wrote KV for every query token
            seq.output_token_ids.append(int(token_id))
            status = self._check_stop(seq, int(token_id))
            if status is not None:
                self._finish(seq, status)
                self._finished_by_update[seq.request_id] = seq
            touched.append(seq)
        if self._finished_by_update:
            self.running = deque(seq for seq in self.running if not seq.is_finished)
        return touched

    def _schedule_decodes(self) -> tuple[list[Sequence], list[Sequence]]:
        scheduled: list[Sequence] = []
        preempted: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    victim = self.running.pop()  # the newest
                    self._preempt(victim)
                    preempted.append(victim)
                else:
                    self._preempt(seq)
                    preempted.append(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled, preempted

    def _schedule_prefills(self, num_batched_tokens: int) -> list[Sequence]:
        scheduled: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_new_tokens = seq.num_tokens - seq.num_computed_tokens
            # A prompt longer than the whole budget still runs, as the only
            # prefill of its step (the running decodes ride along), until
            # chunked prefill splits it.
            fits = num_batched_tokens + num_new_tokens <= self.max_num_batched_tokens
            oversized_alone = num_new_tokens > self.max_num_batched_tokens and not scheduled
            if not (fits or oversized_alone):
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(seq)
            num_batched_tokens += num_new_tokens
        return scheduled

    def _build_step_input(self, scheduled: list[Sequence]) -> StepInput:
        block_size = self.block_manager.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        sequences: list[SequenceInput] = []
        for seq in scheduled:
            start, end = seq.num_computed_tokens, seq.num_tokens
            table = seq.block_table
            input_ids.extend(seq.token_ids_from(start))
            positions.extend(range(start, end))
            slot_mapping.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
            sequences.append(
                SequenceInput(
                    query_len=end - start,
                    seq_len=end,
                    block_table=list(table),
                    needs_sample=True,
                    sampling_params=seq.sampling_params,
                    output_index=seq.num_output_tokens,
                )
            )
        return StepInput(input_ids=input_ids, positions=positions, slot_mapping=slot_mapping, sequences=sequences)

    def _check_stop(self, seq: Sequence, token_id: int) -> SequenceStatus | None:
        params = seq.sampling_params
        if token_id in self.eos_token_ids and not params.ignore_eos:
            return SequenceStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)  # also resets num_computed_tokens: recompute all
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        seq.status = status
        self.block_manager.deallocate(seq)
        del self.seqs[seq.request_id]
