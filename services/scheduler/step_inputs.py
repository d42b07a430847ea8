"""Scheduled sequences -> the rows of the flattened batch the runner executes.

The runner keeps each sequence's block table (and sampling params) and, for
penalties, its token history; a sequence's row sends what the runner may not
hold yet, and the Sequence records what it now holds (runner_num_blocks,
runner_has_history), so a steady decode step costs O(1) per sequence.
"""

from __future__ import annotations

from llmexec.scheduler.sequence import Sequence
from llmexec.step import PREVIOUS_TOKEN, SequenceInput

# input_ids, positions, slot_mapping, sequences
Rows = tuple[list[int], list[int], list[int], list[SequenceInput]]


def sequence_input(seq: Sequence, query_len: int, seq_len: int, needs_sample: bool, output_index: int) -> SequenceInput:
    """seq's row, with its whole block table the first time and only the appended blocks after."""
    table, known = seq.block_table, seq.runner_num_blocks
    seq.runner_num_blocks = len(table)
    return SequenceInput(
        query_len=query_len,
        seq_len=seq_len,
        block_table=[] if known else list(table),
        needs_sample=needs_sample,
        sampling_params=seq.sampling_params,
        output_index=output_index,
        block_table_id=seq.request_id,
        appended_blocks=table[known:] if known else None,
    )


def scheduled_rows(scheduled: dict[Sequence, int], block_size: int) -> Rows:
    """Each sequence's next num_new tokens (a prompt chunk, or the last token for a decode)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    sequences: list[SequenceInput] = []
    for seq, num_new in scheduled.items():
        start = seq.num_computed_tokens
        end = start + num_new
        table = seq.block_table
        input_ids.extend(seq.token_ids_slice(start, end))
        positions.extend(range(start, end))
        slot_mapping.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        seq_input = sequence_input(seq, num_new, end, end == seq.num_tokens, seq.num_output_tokens)
        if seq.sampling_params.needs_token_history:
            seq_input.seq_id = seq.request_id
            if not seq.runner_has_history:
                seq_input.context_token_ids = seq.token_ids_slice(0, start)
                seq.runner_has_history = True
        sequences.append(seq_input)
    return input_ids, positions, slot_mapping, sequences


def ahead_rows(ahead: dict[Sequence, int], block_size: int) -> Rows:
    """One PREVIOUS_TOKEN per sequence at `position`, the one after the running step's."""
    slot_mapping, sequences = [], []
    for seq, position in ahead.items():
        table = seq.block_table
        slot_mapping.append(table[position // block_size] * block_size + position % block_size)
        # The running step's token comes first: it is output number num_output_tokens.
        seq_input = sequence_input(seq, 1, position + 1, True, seq.num_output_tokens + 1)
        if seq.sampling_params.needs_token_history:  # the runner holds it: it extends it with the placeholder
            seq_input.seq_id = seq.request_id
        sequences.append(seq_input)
    return [PREVIOUS_TOKEN] * len(ahead), list(ahead.values()), slot_mapping, sequences
