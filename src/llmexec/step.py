"""One forward step's flattened batch and its result, as plain Python.

The scheduler builds a StepInput, the scheduler's runner client turns it into
an ExecuteStepRequest, and the runner turns that back into a StepInput before
making tensors. Tokens of all sequences are concatenated: sequence i owns
rows [sum(query_len[:i]), sum(query_len[:i+1])) of input_ids, positions and
slot_mapping.

Token history on the runner: the penalties need every token a sequence has
seen. The runner keeps that history per seq_id and extends it with each step's
query tokens, so the scheduler sends a sequence's earlier tokens
(context_token_ids) only on the first step the runner sees it (or sees it again
after a preemption or a runner restart), and names the sequences to forget in
finished_seq_ids.

Block tables on the runner: likewise, the runner keeps each sequence's block
table under block_table_id, so a steady decode step carries O(1) data per
sequence: the scheduler sends the whole table only when the runner may not
hold it (first step, after a preemption or a runner restart) and otherwise
just the blocks appended since the sequence's previous step (appended_blocks).
The runner resolves these into whole tables before running the step.

Async scheduling: the scheduler plans step N+1 while step N runs, so a
sequence's query token in N+1 may be the one N is still sampling. The scheduler
sends PREVIOUS_TOKEN in its place and names N in continues_step_id; the runner
fills it in on the device from N's sampled tokens, which the host need not have
seen yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmexec.sampling_params import SamplingParams

PREVIOUS_TOKEN = -1  # in StepInput.input_ids: this sequence's token sampled in step continues_step_id


@dataclass
class SequenceInput:
    query_len: int  # tokens this sequence adds in this step (prompt chunk, or 1 for decode)
    seq_len: int  # tokens in the KV cache after this step, query tokens included
    # Physical block ids in logical order, covering seq_len tokens; [] when appended_blocks is set.
    block_table: list[int]
    needs_sample: bool  # sample a token from this sequence's last row
    # None only on the runner, between decoding a step that extends a kept table and BlockTables.resolve.
    sampling_params: SamplingParams | None = field(default_factory=SamplingParams)
    output_index: int = 0  # tokens generated before this step (keys the seeded draw)
    seq_id: str = ""  # keys the runner's token history; set when sampling needs the history
    # The tokens at positions [0, seq_len - query_len), sent when the runner may not hold them.
    context_token_ids: list[int] | None = None
    block_table_id: str = ""  # keys the block table the runner keeps; "" = block_table is whole, keep nothing
    # Set (with block_table_id): the blocks added to the runner's table since the sequence's previous step.
    appended_blocks: list[int] | None = None


@dataclass
class StepInput:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    sequences: list[SequenceInput]
    finished_seq_ids: list[str] = field(default_factory=list)  # histories the runner may drop
    eos_token_ids: list[int] = field(default_factory=list)  # masked while a sequence is under min_tokens
    runner_instance_id: str = ""  # the runner this step was planned for; "" skips the check
    step_id: int = 0  # the scheduler's number for the step, increasing; 0: unnumbered
    continues_step_id: int = 0  # with PREVIOUS_TOKEN in input_ids: the step whose samples fill them

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenLogprobs:
    """The log-probability of a sampled token under the model's raw distribution,
    its rank there (1 = most likely), and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"t": self.token_id, "l": self.logprob, "r": self.rank, "ti": self.top_token_ids,
                "tl": self.top_logprobs}

    @classmethod
    def from_dict(cls, data: dict) -> TokenLogprobs:
        return cls(int(data["t"]), float(data["l"]), int(data["r"]), [int(t) for t in data["ti"]],
                   [float(x) for x in data["tl"]])


@dataclass
class StepOutput:
    sampled_token_ids: list[int]  # one per sequence with needs_sample, in order
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # aligned; None where not asked
