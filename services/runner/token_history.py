"""The token history the runner keeps per sequence, for the penalties.

Keyed by the step's seq_id. Each step extends a sequence's history with its
query tokens, which are exactly the tokens the runner has not seen: the prompt
chunk, or the token sampled last step. The scheduler sends the earlier tokens
(context_token_ids) the first time, and after anything that may have lost them
(a preemption, a runner restart); a step that repeats positions the runner
already holds (a recompute) truncates first. The scheduler names the
sequences that finished or were preempted in finished_seq_ids and the runner
drops them; as a guard against a scheduler that died before saying so,
at most `capacity` histories are kept, least recently used dropped first.

After a runner restart nothing is kept: a step naming a sequence with
penalties whose earlier tokens the runner lacks is refused with
FAILED_PRECONDITION, which tells the scheduler to recompute.

With async scheduling a query token may be one the previous step sampled on
the device and the host has not seen (PREVIOUS_TOKEN): the history holds
PREVIOUS_TOKEN in its place, the sampler reads the device value instead
(sampled_tokens.history_tails), and fill() writes the token in once the
previous step's result reaches the host, whichever of the two comes first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from llmexec.errors import FailedPreconditionError
from llmexec.step import PREVIOUS_TOKEN, StepInput

DEFAULT_CAPACITY = 16384


class TokenHistories:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._tokens: OrderedDict[str, list[int]] = OrderedDict()
        # A sampled token that reached the host before the placeholder for it: seq_id -> (position, token).
        self._early: dict[str, tuple[int, int]] = {}
        # update() runs as a step is queued, fill() as an earlier one finishes: other threads.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._tokens

    def update(self, step: StepInput, carried_rows: frozenset[int] = frozenset()) -> list[list[int] | None]:
        """Apply step (forget, then extend); return, per sequence with needs_sample,
        its full history after this step's tokens, or None when it has no seq_id.
        carried_rows: rows of step.input_ids holding the previous step's token, not its value.

        Checks every sequence before changing anything, so a refused step leaves
        the histories as they were."""
        with self._lock:
            return self._update(step, carried_rows)

    def fill(self, step: StepInput, sampled_token_ids: list[int]) -> None:
        """step's sampled tokens, now on the host: written over the placeholders that hold
        their place, or kept for the placeholder still to come."""
        if not self._tokens:  # no sequence with penalties: the usual case, nothing to do
            return
        with self._lock:
            for seq, token in zip((s for s in step.sequences if s.needs_sample), sampled_token_ids):
                tokens = self._tokens.get(seq.seq_id) if seq.seq_id else None
                if tokens is None:
                    continue
                position = seq.seq_len  # the sampled token follows the step's last one
                if len(tokens) > position and tokens[position] == PREVIOUS_TOKEN:
                    tokens[position] = token
                elif len(tokens) == position:
                    self._early[seq.seq_id] = (position, token)

    def _update(self, step: StepInput, carried_rows: frozenset[int]) -> list[list[int] | None]:
        for seq_id in step.finished_seq_ids:
            self._tokens.pop(seq_id, None)
            self._early.pop(seq_id, None)
        planned: list[tuple[int, str, list[int] | None, int, list[int]]] = []
        row = 0
        for i, seq in enumerate(step.sequences):
            query = step.input_ids[row : row + seq.query_len]
            row += seq.query_len
            if not seq.seq_id:
                continue
            start = seq.seq_len - seq.query_len
            early = self._early.get(seq.seq_id)
            if row - 1 in carried_rows:  # the only query token: the previous step's, maybe seen already
                query = [early[1] if early is not None and early[0] == start else PREVIOUS_TOKEN]
            context = seq.context_token_ids
            if context is None and start == 0:
                context = []  # a sequence starting over: nothing before its query
            if context is not None and len(context) != start:
                raise FailedPreconditionError(
                    f"sequence {seq.seq_id}: {len(context)} context tokens for {start} positions"
                )
            if context is None and len(self._tokens.get(seq.seq_id, ())) < start:
                raise FailedPreconditionError(
                    f"this runner does not hold the token history of sequence {seq.seq_id} "
                    "(restarted, or forgotten); recompute it with its context"
                )
            planned.append((i, seq.seq_id, context, start, query))
        histories: dict[int, list[int]] = {}
        for i, seq_id, context, start, query in planned:
            self._early.pop(seq_id, None)
            if context is not None:
                tokens = self._tokens[seq_id] = list(context)
            else:
                tokens = self._tokens[seq_id]
                del tokens[start:]  # a recompute repeats positions already held
            tokens.extend(query)
            self._tokens.move_to_end(seq_id)
            histories[i] = tokens
        while len(self._tokens) > self.capacity:
            self._tokens.popitem(last=False)
        return [histories.get(i) for i, seq in enumerate(step.sequences) if seq.needs_sample]
