"""Driving a ModelRunner the way the scheduler does, and checking it against transformers.

`Sequence` plays the scheduler's part for one request (its tokens, its blocks,
the next chunk to run); the `check_*` functions run the standard scenarios and
compare every sampled row with a reference: a function from token ids to
transformers' last-position logits, recomputed from scratch each time.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import torch

from llmexec.loader.weight_plan import materialize, plan_weights, specs_of
from llmexec.models.registry import architecture_of, model_class_for
from llmexec.runner.model_runner import ModelRunner
from llmexec.sampling_params import SamplingParams
from llmexec.step import SequenceInput, StepInput

GREEDY = SamplingParams(temperature=0.0)
NUM_BLOCKS = 128

Reference = Callable[[list[int]], torch.Tensor]  # token ids -> logits [vocab] at the last position


def fused_weights(config: Mapping, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers state dict as the loader would lay it out for our model (q/k/v fused, ...)."""
    model_class = model_class_for(architecture_of(config), config)
    return materialize(plan_weights(model_class, config, specs_of(state_dict)), state_dict)


def hf_reference(model: torch.nn.Module) -> Reference:
    @torch.no_grad()
    def last_logits(token_ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([token_ids])).logits[0, -1]

    return last_logits


def assert_close_relative(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    error = (ours - ref).abs().max().item()
    assert error <= rtol * ref.abs().max().item(), f"max abs error {error} vs max |ref| {ref.abs().max().item()}"


class Sequence:
    """What the scheduler tracks for one request: its tokens, how many are cached, its blocks."""

    def __init__(self, token_ids, free_blocks: list[int], block_size: int, params=GREEDY) -> None:
        self.token_ids = list(token_ids)
        self.num_prompt = len(self.token_ids)
        self.num_cached = 0
        self.block_table: list[int] = []
        self.free_blocks = free_blocks
        self.block_size = block_size
        self.params = params

    def chunk(self, query_len: int | None = None) -> tuple[SequenceInput, list[int], list[int], list[int]]:
        """The next query_len uncached tokens (default: all): (SequenceInput, ids, positions, slots)."""
        start = self.num_cached
        end = len(self.token_ids) if query_len is None else start + query_len
        while len(self.block_table) * self.block_size < end:
            self.block_table.append(self.free_blocks.pop())
        positions = list(range(start, end))
        slots = [self.block_table[p // self.block_size] * self.block_size + p % self.block_size for p in positions]
        self.num_cached = end
        seq = SequenceInput(
            query_len=end - start,
            seq_len=end,
            block_table=list(self.block_table),
            needs_sample=end == len(self.token_ids),
            sampling_params=self.params,
            output_index=len(self.token_ids) - self.num_prompt,
        )
        return seq, self.token_ids[start:end], positions, slots


def make_step(chunks) -> StepInput:
    step = StepInput(input_ids=[], positions=[], slot_mapping=[], sequences=[])
    for seq, ids, positions, slots in chunks:
        step.sequences.append(seq)
        step.input_ids += ids
        step.positions += positions
        step.slot_mapping += slots
    return step


def shuffled_blocks(seed: int = 0) -> list[int]:
    blocks = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(blocks)
    return blocks


def random_prompt(length: int, seed: int, vocab_size: int) -> list[int]:
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def check_prefill_then_decode(
    runner: ModelRunner, reference: Reference, prompt_ids: list[int], steps: int = 24
) -> None:
    """Prefill `prompt_ids`, then decode `steps` greedy tokens; every step's logits and token must match."""
    seq = Sequence(prompt_ids, shuffled_blocks(), runner.block_size)
    for _ in range(steps + 1):
        step = make_step([seq.chunk()])
        logits = runner.execute_logits(step)
        ref = reference(seq.token_ids)
        assert_close_relative(logits[0], ref)
        # Re-running a step rewrites the same slots with the same K/V, so this is safe.
        token = runner.execute(step)[0]
        assert token == ref.argmax().item()
        seq.token_ids.append(token)


def check_mixed_batch(runner: ModelRunner, reference: Reference, vocab_size: int, lengths=(9, 21, 14, 5)) -> None:
    """Four sequences of different lengths in one flattened batch: prefills next to decodes, one
    prompt split into two chunks (the second with earlier context in the cache), then decodes."""
    free_blocks = shuffled_blocks(seed=runner.block_size)
    a, b, c, d = (Sequence(random_prompt(n, n, vocab_size), free_blocks, runner.block_size) for n in lengths)

    def run(step, sequences):
        logits = runner.execute_logits(step)
        assert logits.shape == (len(sequences), vocab_size)
        tokens = runner.execute(step)
        for seq, row, token in zip(sequences, logits, tokens):
            ref = reference(seq.token_ids)
            assert_close_relative(row, ref)
            assert token == ref.argmax().item()
            seq.token_ids.append(token)

    run(make_step([a.chunk(), b.chunk()]), [a, b])
    # Two sequences decode while two prefill; c's prompt is split into two chunks.
    c_first = c.chunk(8)
    assert not c_first[0].needs_sample
    run(make_step([a.chunk(), c_first, b.chunk(), d.chunk()]), [a, b, d])
    run(make_step([a.chunk(), b.chunk(), c.chunk(), d.chunk()]), [a, b, c, d])  # c's chunk has earlier context
    for _ in range(4):
        run(make_step([s.chunk() for s in (d, c, b, a)]), [d, c, b, a])
