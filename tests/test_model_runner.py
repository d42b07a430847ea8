"""The runner's paged Llama against transformers on tiny random models, plus the sampler."""

from __future__ import annotations

import random
from functools import lru_cache

import pytest
import torch
import transformers

from llmexec.errors import CheckpointError, InvalidArgumentError, UnsupportedArchitectureError
from llmexec.models.layers import rope_settings
from llmexec.models.registry import model_class_for, supported_architectures
from llmexec.runner.model_runner import ModelRunner, num_blocks_for_memory
from llmexec.runner.sampler import sample
from llmexec.sampling_params import SamplingParams
from llmexec.step import SequenceInput, StepInput

from tiny_models import TINY_LLAMA as TINY
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so the test positions cross every band
}
GREEDY = SamplingParams(temperature=0.0)
NUM_BLOCKS = 128


@lru_cache(maxsize=None)
def hf_model(variant: str = "llama"):
    torch.manual_seed(0)
    if variant == "mistral":
        config = transformers.MistralConfig(**TINY, sliding_window=None)
    elif variant == "llama3_rope":
        config = transformers.LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE)
    else:
        config = transformers.LlamaConfig(**TINY, tie_word_embeddings=variant == "tied")
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def make_runner(variant: str = "llama", block_size: int = 16, weights=None) -> ModelRunner:
    model = hf_model(variant)
    weights = model.state_dict() if weights is None else weights
    return ModelRunner(model.config.to_dict(), weights, num_blocks=NUM_BLOCKS, block_size=block_size)


@torch.no_grad()
def hf_last_logits(variant: str, token_ids: list[int]) -> torch.Tensor:
    return hf_model(variant)(torch.tensor([token_ids])).logits[0, -1]


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


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, TINY["vocab_size"], (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("variant", ["llama", "llama3_rope", "mistral", "tied"])
def test_prefill_then_decode_matches_transformers(variant):
    runner = make_runner(variant)
    seq = Sequence(prompt(12, seed=1), shuffled_blocks(), runner.block_size)
    for _ in range(25):  # the prefill, then 24 decode steps
        step = make_step([seq.chunk()])
        logits = runner.execute_logits(step)
        ref = hf_last_logits(variant, seq.token_ids)
        assert_close_relative(logits[0], ref)
        # Re-running a step rewrites the same slots with the same K/V, so this is safe.
        token = runner.execute(step)[0]
        assert token == ref.argmax().item()
        seq.token_ids.append(token)


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_mixed_prefill_and_decode_batch_matches_transformers(block_size):
    runner = make_runner(block_size=block_size)
    free_blocks = shuffled_blocks(seed=block_size)
    a, b, c, d = (Sequence(prompt(n, seed=n), free_blocks, block_size) for n in (9, 21, 14, 5))

    def run(step, sequences):
        logits = runner.execute_logits(step)
        assert logits.shape == (len(sequences), TINY["vocab_size"])
        tokens = runner.execute(step)
        for seq, row, token in zip(sequences, logits, tokens):
            ref = hf_last_logits("llama", seq.token_ids)
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


def test_parameters_share_storage_with_the_given_weights():
    weights = hf_model().state_dict()
    runner = make_runner(weights=weights)
    params = dict(runner.model.named_parameters())
    assert params.keys() == weights.keys()
    for name, param in params.items():
        assert param.data_ptr() == weights[name].data_ptr(), name


def test_tied_embeddings_with_or_without_lm_head_in_the_checkpoint():
    weights = hf_model("tied").state_dict()
    without_lm_head = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    seq_ids = prompt(7, seed=3)
    ref = hf_last_logits("tied", seq_ids)
    for given in (weights, without_lm_head):
        runner = make_runner("tied", weights=given)
        assert runner.model.lm_head is None
        seq = Sequence(seq_ids, shuffled_blocks(), runner.block_size)
        assert_close_relative(runner.execute_logits(make_step([seq.chunk()]))[0], ref)


def test_checkpoint_mismatches_raise_checkpoint_error():
    weights = dict(hf_model().state_dict())
    missing = {k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        make_runner(weights=missing)
    with pytest.raises(CheckpointError, match="model.layers.7.extra"):
        make_runner(weights={**weights, "model.layers.7.extra": torch.zeros(1)})
    wrong_shape = {**weights, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*\(64, 64\).*\(32, 64\)"):
        make_runner(weights=wrong_shape)
    wrong_dtype = {**weights, "model.norm.weight": weights["model.norm.weight"].double()}
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        make_runner(weights=wrong_dtype)


def test_invalid_steps_are_rejected_with_invalid_argument():
    runner = make_runner()
    seq, ids, positions, slots = Sequence(prompt(4, seed=4), shuffled_blocks(), runner.block_size).chunk()
    bad_steps = {
        "token ids": make_step([(seq, [0, 1, 2, TINY["vocab_size"]], positions, slots)]),
        "out of range": make_step([(seq, ids, positions, [0, 1, 2, NUM_BLOCKS * runner.block_size])]),
        "query_len": make_step([(SequenceInput(4, 3, seq.block_table, True), ids, positions, slots)]),
        "too few": make_step([(SequenceInput(4, 17, seq.block_table, True), ids, positions, slots)]),
        "positions": make_step([(seq, ids, positions[:3], slots)]),
    }
    for message, step in bad_steps.items():
        with pytest.raises(InvalidArgumentError, match=message):
            runner.execute(step)


def test_seeded_sequence_samples_the_same_tokens_whatever_the_batch():
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1234)

    def generate(with_neighbours: bool) -> list[int]:
        runner = make_runner(block_size=5)
        free_blocks = shuffled_blocks()
        seeded = Sequence(prompt(6, seed=5), free_blocks, 5, params)
        others = [Sequence(prompt(n, seed=n), free_blocks, 5, SamplingParams(seed=n % 2 or None)) for n in (3, 11)]
        batch = [others[0], seeded, others[1]] if with_neighbours else [seeded]
        for _ in range(8):
            tokens = runner.execute(make_step([s.chunk() for s in batch]))
            for s, token in zip(batch, tokens):
                s.token_ids.append(token)
        return seeded.token_ids

    assert generate(with_neighbours=False) == generate(with_neighbours=True)


def test_sampler_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    assert sample(logits, [GREEDY] * 5, [0] * 5) == logits.argmax(-1).tolist()


def test_sampler_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(top_k=1)] * 3 + [SamplingParams(temperature=2.0, top_p=1e-6)] * 3
    assert sample(logits, params, list(range(6))) == logits.argmax(-1).tolist()


def test_sampler_seeded_rows_ignore_batch_composition():
    gen = torch.Generator().manual_seed(2)
    row = torch.randn(1, 1000, generator=gen)
    params = SamplingParams(temperature=1.5, top_p=0.95, seed=7)
    alone = [sample(row, [params], [i])[0] for i in range(20)]
    assert len(set(alone)) > 1  # the output index moves the draw on
    for i in range(20):
        batch = torch.cat([torch.randn(2, 1000, generator=gen), row])
        batch_params = [SamplingParams(seed=99), GREEDY, params]
        assert sample(batch, batch_params, [5, 0, i])[2] == alone[i]


def test_sampler_follows_the_distribution_and_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    tokens = torch.tensor(sample(logits, [SamplingParams()] * 4000, [0] * 4000))
    frequencies = torch.bincount(tokens, minlength=4) / 4000
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    top_two = sample(logits, [SamplingParams(top_k=2)] * 4000, [0] * 4000)
    assert set(top_two) == {0, 1}
    nucleus = sample(logits, [SamplingParams(top_p=0.7)] * 4000, [0] * 4000)  # 0.5 + 0.3 reaches 0.7
    assert set(nucleus) == {0, 1}


def test_registry_names_supported_architectures_and_refuses_sliding_window():
    assert {"LlamaForCausalLM", "MistralForCausalLM"} <= set(supported_architectures())
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        model_class_for("GPTNeoXForCausalLM")
    mistral = {"max_position_embeddings": 32768}
    with pytest.raises(UnsupportedArchitectureError, match="sliding"):
        model_class_for("MistralForCausalLM", {**mistral, "sliding_window": 4096})
    assert model_class_for("MistralForCausalLM", {**mistral, "sliding_window": None}).__name__ == "LlamaForCausalLM"


def test_old_style_rope_config_reads_like_rope_parameters():
    params = dict(LLAMA3_ROPE)
    old_style = {"rope_theta": params.pop("rope_theta"), "rope_scaling": params}
    assert rope_settings(old_style) == rope_settings({"rope_parameters": LLAMA3_ROPE})
    assert rope_settings({"rope_theta": 10000.0, "rope_scaling": None}) == (10000.0, None)


def test_num_blocks_for_memory():
    config = hf_model().config.to_dict()
    # 2 (K and V) * 2 layers * 16 slots * 2 kv heads * 16 head_dim * 2 bytes = 4096 bytes a block
    assert num_blocks_for_memory(config, 16, 10 * 4096 + 1, torch.bfloat16) == 10
