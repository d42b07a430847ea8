"""One token budget per step: which tokens of which sequences run next.

In the manner of vLLM's v1 scheduler, a step is not "prefill" or "decode": each
scheduled sequence contributes num_tokens - num_computed_tokens tokens, cut to
what is left of max_num_batched_tokens. Running sequences go first, decodes
before unfinished prompt chunks, so a long prompt never starves the decodes
(max_num_batched_tokens >= max_num_seqs leaves one token for each). Waiting
sequences are then admitted in (priority, arrival) order while the budget,
max_num_seqs and the free blocks allow, each first taking the longest prefix
of full blocks the prefix cache holds. A prompt longer than the budget runs in
chunks over several steps; only its last chunk samples a token.

When a running sequence cannot get the blocks it needs, the running sequence
with the lowest priority (the highest value), newest first among equals, is
preempted by recompute: its blocks are released (their cached full blocks may
serve it again) and it goes back to the waiting queue, in its old place.

The caller's loop:
    step = scheduler.schedule()        # None when nothing can run
    output = runner.execute(step.step_input)
    for seq in scheduler.update(step, output): stream seq's new token
Stop strings are text: the caller detects them and calls finish(id, "stop").

Async scheduling: while a step runs, schedule_ahead(step) plans the next one
before update() has seen the running step's tokens, when that next step is
plain decoding of the same sequences: each continues from the token the
running step is sampling (PREVIOUS_TOKEN, filled in by the runner). The caller
sends it at once, so the runner never waits for the scheduler; it then calls
update() for each step in order. A sequence that the running step finishes has
computed one token too many, which update() drops. Anything else (admitting a
waiting prompt, a prompt chunk, preempting) waits for a synchronous schedule()
once nothing is in flight, so preemption never frees the blocks of a step that
is still running.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from llmexec.errors import InvalidArgumentError, ResourceExhaustedError
from llmexec.scheduler.block_manager import BlockManager
from llmexec.scheduler.sequence import FINISHED_STATUS, Sequence, SequenceStatus
from llmexec.scheduler.step_inputs import Rows, ahead_rows, scheduled_rows
from llmexec.step import StepInput, StepOutput


@dataclass
class ScheduledStep:
    step_input: StepInput
    sequences: list[Sequence]  # in the order of step_input.sequences
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting by this schedule()

    @property
    def num_tokens(self) -> int:
        return self.step_input.num_tokens


def queue_key(seq: Sequence) -> tuple:
    """Who is served first: lower priority value, then earlier arrival."""
    return (seq.priority, seq.arrival_time, seq.admission_no)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 8192,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
        max_num_waiting: int = 0,
    ):
        """max_num_waiting: add() refuses with ResourceExhaustedError past this many
        waiting sequences; 0 means no limit."""
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
        if max_num_waiting < 0:
            raise InvalidArgumentError(f"max_num_waiting must be >= 0 (0: no limit), got {max_num_waiting}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_num_waiting = max_num_waiting
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Sequence] = []  # sorted by queue_key
        self.running: list[Sequence] = []  # in admission order
        self.seqs: dict[str, Sequence] = {}  # unfinished, by request_id
        self.num_preemptions = 0
        self._admission_counter = itertools.count(1)
        self._finished_by_update: dict[str, Sequence] = {}
        self._runner_forget: list[str] = []  # histories the runner may drop, sent with the next step
        self._step_ids = itertools.count(1)

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

    def check_room(self, num_new: int = 1) -> None:
        """Raise ResourceExhaustedError if num_new more waiting sequences would pass the limit."""
        if self.max_num_waiting and len(self.waiting) + num_new > self.max_num_waiting:
            raise ResourceExhaustedError(
                f"the waiting queue is full ({len(self.waiting)} requests wait, limit {self.max_num_waiting}); "
                "retry later"
            )

    def add(self, seq: Sequence, *, force: bool = False) -> None:
        """Queue seq (status WAITING, no blocks) in (priority, arrival) order.

        Raises ResourceExhaustedError when the waiting queue is full, unless
        force (sequences recovered after a restart are not refused).
        """
        if seq.request_id in self.seqs:
            raise InvalidArgumentError(f"request_id {seq.request_id!r} is already in flight")
        if not seq.prompt_token_ids:
            raise InvalidArgumentError("the prompt must have at least one token")
        if seq.num_tokens >= self.max_model_len:
            raise InvalidArgumentError(
                f"the prompt has {seq.num_tokens} tokens; max_model_len {self.max_model_len} "
                "leaves no room to generate"
            )
        if not force:
            self.check_room()
        seq.status = SequenceStatus.WAITING
        seq.admission_no = next(self._admission_counter)
        self.seqs[seq.request_id] = seq
        bisect.insort(self.waiting, seq, key=queue_key)

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
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._finish(seq, status)
        return seq

    def remove_all(self) -> list[Sequence]:
        """Take every unfinished sequence out (blocks released, nothing computed), oldest first."""
        seqs = sorted(self.seqs.values(), key=queue_key)
        for seq in seqs:
            self._release(seq)
            seq.status = SequenceStatus.WAITING
        self.waiting.clear()
        self.running.clear()
        self.seqs.clear()
        return seqs

    def reset(self) -> list[Sequence]:
        """The runner lost its KV cache: every running sequence goes back to waiting
        to be recomputed, and the prefix cache is forgotten. Returns those preempted."""
        preempted = sorted(self.running, key=queue_key)
        for seq in preempted:
            self._preempt(seq)
        self.block_manager.reset_prefix_cache()
        self._runner_forget.clear()
        return preempted

    def schedule(self) -> ScheduledStep | None:
        """The next step under one token budget; None if nothing can run."""
        budget = self.max_num_batched_tokens
        scheduled: dict[Sequence, int] = {}  # sequence -> tokens it computes this step
        preempted: list[Sequence] = []
        # Decodes first, then unfinished prompt chunks; by priority and age within each.
        order = sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed_tokens > 1, queue_key(s)))
        for seq in order:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = max(self.running, key=queue_key)
                if victim in scheduled:
                    budget += scheduled.pop(victim)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled[seq] = num_new
                budget -= num_new
        # Admitting prompts right after a preemption would only thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.block_manager.computed_prefix(seq)
            num_new = min(seq.num_tokens - len(hits) * self.block_manager.block_size, budget)
            if not self.block_manager.allocate_slots(seq, num_new, hits):
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled[seq] = num_new
            budget -= num_new
        if not scheduled:
            return None
        return ScheduledStep(
            step_input=self._step_input(scheduled_rows(scheduled, self.block_manager.block_size)),
            sequences=list(scheduled), preempted=preempted,
        )

    def schedule_ahead(self, running: ScheduledStep) -> ScheduledStep | None:
        """The step after `running` (sent, not yet updated), planned now: one token per sequence
        that `running` samples for, each continuing from that token. None when the next step
        is not that simple (see the module's docstring)."""
        if self.waiting and len(self.running) < self.max_num_seqs:
            return None  # a prompt can be admitted: schedule() does it
        ahead: dict[Sequence, int] = {}  # sequence -> its position in the ahead step
        num_continuing = num_new_blocks = 0
        for seq, inp in zip(running.sequences, running.step_input.sequences):
            if not inp.needs_sample or seq.is_finished:
                continue
            num_continuing += 1
            params = seq.sampling_params
            if params.needs_token_history and not seq.runner_has_history:
                return None  # its history must go with a token the runner has
            if seq.num_output_tokens + 1 >= params.max_tokens or inp.seq_len + 1 >= self.max_model_len:
                continue  # the running step gives its last token
            ahead[seq] = inp.seq_len
            num_new_blocks += max(0, self.block_manager.num_blocks_for(inp.seq_len + 1) - len(seq.block_table))
        if num_continuing != len(self.running):
            return None  # a sequence mid-prompt, or one that did not run
        if not ahead or num_new_blocks > self.block_manager.num_free_blocks:
            return None
        for seq, position in ahead.items():
            allocated = self.block_manager.allocate_slots(seq, position + 1 - seq.num_computed_tokens)
            assert allocated, "counted free blocks above"
        step_input = self._step_input(ahead_rows(ahead, self.block_manager.block_size))
        step_input.continues_step_id = running.step_input.step_id
        return ScheduledStep(step_input=step_input, sequences=list(ahead))

    def update(self, step: ScheduledStep, output: StepOutput | list[int]) -> list[Sequence]:
        """Record what the step computed; append each sampled token and apply token-level stops.

        output holds one token per sequence with needs_sample, in order (a plain
        list of token ids is accepted too). Finished sequences release their
        blocks. Returns the sequences that got a token, finished ones included
        (see finish_reason); sequences aborted while the step ran are skipped.
        """
        if isinstance(output, list):
            output = StepOutput(sampled_token_ids=output)
        inputs = step.step_input.sequences
        num_sampled = sum(1 for s in inputs if s.needs_sample)
        if len(output.sampled_token_ids) != num_sampled:
            raise InvalidArgumentError(
                f"got {len(output.sampled_token_ids)} sampled tokens for {num_sampled} sequences that sample"
            )
        logprobs = output.logprobs or [None] * num_sampled
        self._finished_by_update = {}
        touched = []
        sample_index = 0
        for seq, seq_input in zip(step.sequences, inputs):
            if seq_input.needs_sample:
                token_id, token_logprobs = int(output.sampled_token_ids[sample_index]), logprobs[sample_index]
                sample_index += 1
            if seq.is_finished:
                continue
            seq.num_computed_tokens = seq_input.seq_len  # the step wrote KV for every query token
            if not seq_input.needs_sample:
                continue
            seq.output_token_ids.append(token_id)
            if seq.sampling_params.logprobs is not None and token_logprobs is not None:
                seq.output_logprobs.append(token_logprobs)
            status = self._check_stop(seq, token_id)
            if status is not None:
                self.running.remove(seq)
                self._finish(seq, status)
                self._finished_by_update[seq.request_id] = seq
            touched.append(seq)
        return touched

    def _step_input(self, rows: Rows) -> StepInput:
        input_ids, positions, slot_mapping, sequences = rows
        forget, self._runner_forget = self._runner_forget, []
        return StepInput(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            sequences=sequences,
            finished_seq_ids=forget,
            eos_token_ids=sorted(self.eos_token_ids),
            step_id=next(self._step_ids),
        )

    def _check_stop(self, seq: Sequence, token_id: int) -> SequenceStatus | None:
        params = seq.sampling_params
        if seq.num_output_tokens > params.min_tokens:  # the runner masks them before that
            if token_id in self.eos_token_ids and not params.ignore_eos:
                return SequenceStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                return SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)  # also resets num_computed_tokens: recompute all
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=queue_key)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq.runner_has_history or seq.runner_num_blocks:
            self._runner_forget.append(seq.request_id)
            seq.runner_has_history, seq.runner_num_blocks = False, 0

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        seq.status = status
        self._release(seq)
        del self.seqs[seq.request_id]
