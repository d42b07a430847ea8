"""The last step's sampled tokens, kept on the device for the step that continues it.

With async scheduling (see llmexec.step) the scheduler sends step N+1 before it
has seen N's tokens: each sequence's query token in N+1 is PREVIOUS_TOKEN. The
runner keeps N's sampled tokens where the sampler left them (on the GPU, not yet
copied to the host) and fills the placeholders with a device-side copy, so N+1
is queued behind N without the host waiting for N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmexec.errors import FailedPreconditionError, InvalidArgumentError
from llmexec.host_to_device import to_device
from llmexec.step import PREVIOUS_TOKEN, StepInput


@dataclass
class CarriedTokens:
    """Rows of a step's input_ids to overwrite on the device, and their values (int64, on the device)."""

    rows: list[int]
    values: torch.Tensor
    on_host: bool = False  # write_into put the values into the step's input_ids

    def write_into(self, input_ids: list[int]) -> None:
        """Put the tokens into the host's input_ids (waits for the device): for paths that
        need every token on the host, such as the tensor-parallel ranks."""
        for row, token in zip(self.rows, self.values.tolist()):
            input_ids[row] = token
        self.on_host = True

    def history_tails(self, step: StepInput, histories: list[list[int] | None]) -> dict[int, torch.Tensor]:
        """Per sampled sequence (by its index among them) whose token history ends in the
        placeholder for a token carried here: that token, on the device."""
        if not any(histories):  # no sequence with penalties: the usual case
            return {}
        carried_at = {row: k for k, row in enumerate(self.rows)}
        tails, row, sampled = {}, 0, 0
        for seq in step.sequences:
            row += seq.query_len
            if not seq.needs_sample:
                continue
            k, history = carried_at.get(row - 1), histories[sampled]
            if k is not None and history is not None and history[-1] == PREVIOUS_TOKEN:
                tails[sampled] = self.values[k]
            sampled += 1
        return tails


class SampledTokens:
    def __init__(self) -> None:
        self.step_id = 0  # the last step started here (0: none numbered)
        self._tokens: torch.Tensor | None = None  # what it sampled, one row per sampling sequence
        self._rows: dict[str, int] = {}  # block_table_id -> row of _tokens

    def record(self, step: StepInput, tokens: torch.Tensor | None) -> None:
        """Step started here and sampled `tokens` (None: it failed, so nothing may continue it)."""
        self.step_id = step.step_id
        self._tokens = tokens
        ids = [s.block_table_id for s in step.sequences if s.needs_sample]
        self._rows = {seq_id: row for row, seq_id in enumerate(ids) if seq_id} if tokens is not None else {}

    def carried(self, step: StepInput) -> CarriedTokens | None:
        """Where step's PREVIOUS_TOKEN placeholders are and what fills them (None when it has none).
        The placeholders in step.input_ids become 0, a valid id for the checks that follow; the
        device copy gets the real tokens. Refuses a step that does not continue the last one."""
        if PREVIOUS_TOKEN not in step.input_ids:
            return None
        if not step.continues_step_id or step.continues_step_id != self.step_id:
            raise FailedPreconditionError(
                f"step {step.step_id} continues step {step.continues_step_id}, but the last step started on this "
                f"runner is {self.step_id}: its tokens are not here; recompute"
            )
        num_placeholders = step.input_ids.count(PREVIOUS_TOKEN)
        rows, sources, row = [], [], 0
        for i, seq in enumerate(step.sequences):
            row += seq.query_len
            if step.input_ids[row - 1] != PREVIOUS_TOKEN:
                continue
            if seq.query_len != 1:
                raise InvalidArgumentError(f"sequence {i}: a {PREVIOUS_TOKEN} token must be its only query token")
            source = self._rows.get(seq.block_table_id)
            if source is None:
                raise FailedPreconditionError(
                    f"sequence {i} ({seq.block_table_id!r}) continues step {self.step_id}, which sampled no token "
                    "for it here; recompute"
                )
            rows.append(row - 1)
            sources.append(source)
        if len(rows) != num_placeholders:
            raise InvalidArgumentError(f"a {PREVIOUS_TOKEN} token may only be a sequence's one query token")
        for placeholder in rows:
            step.input_ids[placeholder] = 0
        if sources == list(range(len(sources))):  # the usual case: every sequence continues, in order
            return CarriedTokens(rows, self._tokens[: len(sources)])
        return CarriedTokens(rows, self._tokens.index_select(0, to_device(sources, self._tokens.device)))
