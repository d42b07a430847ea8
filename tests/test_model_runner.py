"""The runner's paged Llama against transformers on tiny random models, plus the sampler."""

from __future__ import annotations

from functools import cache

import pytest
import torch
import transformers
from paged_harness import (
    GREEDY,
    NUM_BLOCKS,
    Sequence,
    assert_close_relative,
    check_mixed_batch,
    check_prefill_then_decode,
    fused_weights,
    make_step,
    random_prompt,
    shuffled_blocks,
)
from tiny_models import TINY_LLAMA as TINY

from llmexec.errors import CheckpointError, InvalidArgumentError, UnsupportedArchitectureError
from llmexec.models.layers import rope_settings
from llmexec.models.registry import model_class_for, supported_architectures
from llmexec.runner.model_runner import ModelRunner, num_blocks_for_memory
from llmexec.runner.sampler import sample
from llmexec.sampling_params import SamplingParams
from llmexec.step import SequenceInput

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so the test positions cross every band
}


@cache
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
    """weights: as the loader lays them out (fused); default: the variant's own, fused."""
    model = hf_model(variant)
    config = model.config.to_dict()
    weights = fused_weights(config, model.state_dict()) if weights is None else weights
    return ModelRunner(config, weights, num_blocks=NUM_BLOCKS, block_size=block_size)


@torch.no_grad()
def hf_last_logits(variant: str, token_ids: list[int]) -> torch.Tensor:
    return hf_model(variant)(torch.tensor([token_ids])).logits[0, -1]


def prompt(length: int, seed: int) -> list[int]:
    return random_prompt(length, seed, TINY["vocab_size"])


@pytest.mark.parametrize("variant", ["llama", "llama3_rope", "mistral", "tied"])
def test_prefill_then_decode_matches_transformers(variant):
    check_prefill_then_decode(make_runner(variant), lambda ids: hf_last_logits(variant, ids), prompt(12, seed=1))


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_mixed_prefill_and_decode_batch_matches_transformers(block_size):
    check_mixed_batch(make_runner(block_size=block_size), lambda ids: hf_last_logits("llama", ids), TINY["vocab_size"])


def test_parameters_share_storage_with_the_given_weights():
    state_dict = hf_model().state_dict()
    weights = fused_weights(hf_model().config.to_dict(), state_dict)
    assert weights["model.norm.weight"] is state_dict["model.norm.weight"]  # unfused tensors pass through
    assert "model.layers.0.self_attn.qkv_proj.weight" in weights
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
    config = hf_model("tied").config.to_dict()
    for given in (weights, without_lm_head):
        runner = make_runner("tied", weights=fused_weights(config, given))
        assert runner.model.lm_head is None
        seq = Sequence(seq_ids, shuffled_blocks(), runner.block_size)
        assert_close_relative(runner.execute_logits(make_step([seq.chunk()]))[0], ref)


def test_checkpoint_mismatches_raise_checkpoint_error():
    weights = fused_weights(hf_model().config.to_dict(), hf_model().state_dict())
    missing = {k: v for k, v in weights.items() if k != "model.layers.1.mlp.gate_up_proj.weight"}
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.gate_up_proj.weight"):
        make_runner(weights=missing)
    with pytest.raises(CheckpointError, match="model.layers.7.extra"):
        make_runner(weights={**weights, "model.layers.7.extra": torch.zeros(1)})
    wrong_shape = {**weights, "model.layers.0.self_attn.qkv_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(CheckpointError, match=r"qkv_proj.weight.*\(64, 64\).*\(128, 64\)"):
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


def test_registry_names_supported_architectures_and_checks_configs():
    assert {"LlamaForCausalLM", "MistralForCausalLM"} <= set(supported_architectures())
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        model_class_for("T5ForConditionalGeneration")
    mistral = {"max_position_embeddings": 32768, "sliding_window": 4096}
    assert model_class_for("MistralForCausalLM", mistral).__name__ == "LlamaForCausalLM"
    longrope = {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0]}}
    with pytest.raises(UnsupportedArchitectureError, match="longrope"):
        model_class_for("Phi3ForCausalLM", longrope)
    with pytest.raises(UnsupportedArchitectureError, match="gelu"):
        model_class_for("LlamaForCausalLM", {"hidden_act": "gelu"})


def test_old_style_rope_config_reads_like_rope_parameters():
    params = dict(LLAMA3_ROPE)
    old_style = {"rope_theta": params.pop("rope_theta"), "rope_scaling": params}
    assert rope_settings(old_style) == rope_settings({"rope_parameters": LLAMA3_ROPE})
    assert rope_settings({"rope_theta": 10000.0, "rope_scaling": None}) == (10000.0, None)


def test_num_blocks_for_memory():
    config = hf_model().config.to_dict()
    # 2 (K and V) * 2 layers * 16 slots * 2 kv heads * 16 head_dim * 2 bytes = 4096 bytes a block
    assert num_blocks_for_memory(config, 16, 10 * 4096 + 1, torch.bfloat16) == 10
