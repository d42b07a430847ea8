"""The block table and sampling params the runner keeps per sequence, so steps need not resend them.

Keyed by the step's block_table_id. A sequence's first step (and its first
after a preemption or a runner restart) carries its whole table; later steps
carry only the blocks appended since (appended_blocks, most often none), which
resolve() adds to the kept table before the step runs, leaving every
SequenceInput with its whole table. The sampling params come with the whole
table and are kept with it; a step extending the table may leave them out. The scheduler names the sequences that
finished or were preempted in finished_seq_ids and the runner drops their
tables; as a guard against a scheduler that died before saying so, at most
`capacity` tables are kept, least recently used dropped first.

A step that extends a table this runner does not hold (it restarted, or
forgot it) is refused with FAILED_PRECONDITION, which tells the scheduler to
recompute.
"""

from __future__ import annotations

from collections import OrderedDict

from llmexec.errors import FailedPreconditionError, InvalidArgumentError
from llmexec.sampling_params import SamplingParams
from llmexec.step import StepInput

DEFAULT_CAPACITY = 16384


class BlockTables:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._tables: OrderedDict[str, tuple[list[int], SamplingParams]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, block_table_id: str) -> bool:
        return block_table_id in self._tables

    def resolve(self, step: StepInput) -> None:
        """Forget finished_seq_ids, then give every sequence of step its whole block table
        (keeping the ones with a block_table_id). Checks every sequence before changing anything,
        so a refused step leaves the tables as they were."""
        forgotten = set(step.finished_seq_ids)
        for i, seq in enumerate(step.sequences):
            if seq.appended_blocks is None and seq.sampling_params is None:
                raise InvalidArgumentError(f"sequence {i}: sampling_params is required with a whole block table")
            if seq.appended_blocks is not None and (seq.block_table_id in forgotten
                                                    or seq.block_table_id not in self._tables):
                raise FailedPreconditionError(
                    f"this runner does not hold the block table of sequence {seq.block_table_id} "
                    "(restarted, or forgotten); recompute it with its whole table"
                )
        for block_table_id in forgotten:
            self._tables.pop(block_table_id, None)
        for seq in step.sequences:
            if not seq.block_table_id:
                continue
            if seq.appended_blocks is None:
                self._tables[seq.block_table_id] = (list(seq.block_table), seq.sampling_params)
            else:
                table, params = self._tables[seq.block_table_id]
                table.extend(seq.appended_blocks)
                seq.block_table, seq.appended_blocks = list(table), None
                if seq.sampling_params is None:
                    seq.sampling_params = params
                else:
                    self._tables[seq.block_table_id] = (table, seq.sampling_params)
            self._tables.move_to_end(seq.block_table_id)
        while len(self._tables) > self.capacity:
            self._tables.popitem(last=False)
