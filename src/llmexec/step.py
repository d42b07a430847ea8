"""One forward step's flattened batch, as plain Python.

The scheduler builds a StepInput, the scheduler's runner client turns it into
an ExecuteStepRequest, and the runner turns that back into a StepInput before
making tensors. Tokens of all sequences are concatenated: sequence i owns
rows [sum(query_len[:i]), sum(query_len[:i+1])) of input_ids, positions and
slot_mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmexec.sampling_params import SamplingParams


@dataclass
class SequenceInput:
    query_len: int  # tokens this sequence adds in this step (prompt chunk, or 1 for decode)
    seq_len: int  # tokens in the KV cache after this step, query tokens included
    block_table: list[int]  # physical block ids in logical order, covering seq_len tokens
    needs_sample: bool  # sample a token from this sequence's last row
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    output_index: int = 0  # tokens generated before this step (keys the seeded draw)


@dataclass
class StepInput:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    sequences: list[SequenceInput]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)
