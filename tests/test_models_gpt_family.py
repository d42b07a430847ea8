"""GPT-2, GPT-NeoX, OPT and BLOOM through the runner's paged path, against transformers.

Each architecture runs on a tiny random checkpoint transformers makes here (float32),
from its state_dict and once through the real loader path (save_pretrained ->
checkpoint reader -> shared memory -> attach -> ModelRunner).
"""

from __future__ import annotations

import math
import re
from functools import cache

import pytest
import torch
import transformers
from test_model_runner import NUM_BLOCKS, Sequence, assert_close_relative, make_step, shuffled_blocks

from llmexec.errors import CheckpointError
from llmexec.kernels.torch_reference import paged_attention, reshape_and_cache
from llmexec.loader.checkpoint import open_checkpoint
from llmexec.loader.shm_store import SharedWeights
from llmexec.models.attention import AttentionMetadata
from llmexec.models.gpt_neox import rotary_settings
from llmexec.models.positional import alibi_slopes
from llmexec.models.registry import architecture_of, supported_architectures
from llmexec.runner.model_runner import ModelRunner, kv_cache_spec
from llmexec.runner.weight_attach import attach_weights
from llmexec.step import SequenceInput, StepInput

VOCAB = 256
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128),
    "gpt2_layer_scaled": lambda: transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, scale_attn_by_inverse_layer_idx=True
    ),
    "neox": lambda: transformers.GPTNeoXConfig(  # Pythia: a quarter of each head rotates, parallel residual
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        rotary_pct=0.25,
    ),
    "neox_sequential": lambda: transformers.GPTNeoXConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        rotary_pct=0.5,
        use_parallel_residual=False,
        tie_word_embeddings=True,
    ),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    ),
    "opt_projected_post_norm": lambda: transformers.OPTConfig(  # OPT-350m's shape
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        do_layer_norm_before=False,
    ),
    "bloom": lambda: transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB),
    "bloom_6_heads": lambda: transformers.BloomConfig(  # not a power of two: the interleaved extra slopes
        hidden_size=48, n_layer=2, n_head=6, vocab_size=VOCAB, apply_residual_connection_post_layernorm=True
    ),
}
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "neox": "GPTNeoXForCausalLM",
    "opt": "OPTForCausalLM",
    "bloom": "BloomForCausalLM",
}


@cache
def hf_model(variant: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[variant](), dtype=torch.float32).eval()
    # Random init leaves biases and some norms at 0/1; randomize everything so each term counts.
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def make_runner(variant: str, block_size: int = 16, weights=None) -> ModelRunner:
    model = hf_model(variant)
    weights = model.state_dict() if weights is None else weights
    return ModelRunner(model.config.to_dict(), weights, num_blocks=NUM_BLOCKS, block_size=block_size)


@torch.no_grad()
def hf_last_logits(variant: str, token_ids: list[int]) -> torch.Tensor:
    return hf_model(variant)(torch.tensor([token_ids])).logits[0, -1]


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_and_check(runner, variant, step, sequences):
    """One step: logits of every sampled sequence match transformers; greedy tokens are its argmax."""
    logits = runner.execute_logits(step)
    tokens = runner.execute(step)  # re-running a step rewrites the same slots with the same K/V
    assert len(tokens) == len(sequences)
    for seq, row, token in zip(sequences, logits, tokens):
        ref = hf_last_logits(variant, seq.token_ids)
        assert_close_relative(row, ref)
        assert token == ref.argmax().item()
        seq.token_ids.append(token)


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_prefill_then_24_decode_steps_match_transformers(variant):
    runner = make_runner(variant)
    seq = Sequence(prompt(12, seed=1), shuffled_blocks(), runner.block_size)
    for _ in range(25):  # the prefill, then 24 decode steps
        run_and_check(runner, variant, make_step([seq.chunk()]), [seq])
    assert len(seq.token_ids) == 12 + 25


@pytest.mark.parametrize("block_size", [1, 5, 16])  # 5 divides none of the prompt lengths
@pytest.mark.parametrize("variant", ["gpt2", "neox", "opt_projected_post_norm", "bloom_6_heads"])
def test_mixed_prefill_and_decode_batch_matches_transformers(variant, block_size):
    runner = make_runner(variant, block_size)
    free_blocks = shuffled_blocks(seed=block_size)
    a, b, c, d = (Sequence(prompt(n, seed=n), free_blocks, block_size) for n in (9, 22, 13, 6))
    run_and_check(runner, variant, make_step([a.chunk(), b.chunk()]), [a, b])
    # Two sequences decode while two prefill; c's prompt is split in two chunks.
    c_first = c.chunk(8)
    assert not c_first[0].needs_sample
    run_and_check(runner, variant, make_step([a.chunk(), c_first, b.chunk(), d.chunk()]), [a, b, d])
    run_and_check(runner, variant, make_step([a.chunk(), b.chunk(), c.chunk(), d.chunk()]), [a, b, c, d])
    for _ in range(3):
        run_and_check(runner, variant, make_step([s.chunk() for s in (d, c, b, a)]), [d, c, b, a])


@pytest.mark.parametrize("variant", ["gpt2", "neox", "opt_projected_post_norm", "bloom"])
def test_loader_path_binds_shared_memory_without_copying(variant, tmp_path):
    model = hf_model(variant)
    model.save_pretrained(tmp_path)  # what a user downloads: names as transformers writes them
    checkpoint = open_checkpoint(str(tmp_path))
    assert checkpoint.architecture == ARCHITECTURES[variant.split("_")[0]]
    with SharedWeights.create(f"gptfam-{variant}", checkpoint) as shared:
        attached = attach_weights(shared.layout)
        runner = ModelRunner(checkpoint.config, attached, num_blocks=NUM_BLOCKS, block_size=16)
    # The file is unlinked; the runner's mapping keeps the weights alive.
    segment = next(iter(attached.values())).untyped_storage().data_ptr()
    for name, param in runner.model.named_parameters():
        assert param.untyped_storage().data_ptr() == segment, f"{name} was copied out of shared memory"
    seq = Sequence(prompt(10, seed=2), shuffled_blocks(), 16)
    for _ in range(4):
        run_and_check(runner, variant, make_step([seq.chunk()]), [seq])


def original_checkpoint_names(variant: str) -> dict[str, torch.Tensor]:
    """The state dict named as the original hub checkpoints name it, saved buffers included."""
    weights = {name: t for name, t in hf_model(variant).state_dict().items() if name != "lm_head.weight"}
    if variant == "gpt2":  # openai-community/gpt2: no "transformer." prefix, causal-mask buffers saved
        weights = {name.removeprefix("transformer."): t for name, t in weights.items()}
        mask = torch.tril(torch.ones(128, 128, dtype=torch.uint8)).view(1, 1, 128, 128)
        weights |= {f"h.{i}.attn.bias": mask.clone() for i in range(2)}
        weights |= {f"h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(2)}
    elif variant == "neox":  # EleutherAI/pythia-*: embed_out, mask and rotary buffers saved
        weights["embed_out.weight"] = hf_model(variant).state_dict()["lm_head.weight"]
        weights |= {
            f"gpt_neox.layers.{i}.attention.{buffer}": torch.zeros(1)
            for i in range(2)
            for buffer in ("bias", "masked_bias", "rotary_emb.inv_freq")
        }
    elif variant == "opt":  # facebook/opt-*: "decoder.*" without "model."
        weights = {name.removeprefix("model."): t for name, t in weights.items()}
    elif variant == "bloom":  # bigscience/bloom-*: no "transformer." prefix
        weights = {name.removeprefix("transformer."): t for name, t in weights.items()}
    return weights


@pytest.mark.parametrize("variant", ["gpt2", "neox", "opt", "bloom"])
def test_original_hub_checkpoint_names_load(variant):
    runner = make_runner(variant, weights=original_checkpoint_names(variant))
    seq = Sequence(prompt(7, seed=3), shuffled_blocks(), 16)
    run_and_check(runner, variant, make_step([seq.chunk()]), [seq])


def test_checkpoint_mismatches_raise_checkpoint_error():
    weights = dict(hf_model("gpt2").state_dict())
    missing = {k: v for k, v in weights.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(CheckpointError, match=re.escape("transformer.h.1.mlp.c_fc.bias")):
        make_runner("gpt2", weights=missing)
    with pytest.raises(CheckpointError, match="transformer.h.0.extra"):
        make_runner("gpt2", weights={**weights, "transformer.h.0.extra": torch.zeros(1)})
    # Conv1D weights are [in, out]: an nn.Linear-shaped tensor is refused, not silently transposed.
    transposed = {**weights, "transformer.h.0.mlp.c_fc.weight": weights["transformer.h.0.mlp.c_fc.weight"].t()}
    with pytest.raises(CheckpointError, match=r"c_fc.weight.*\(256, 64\).*\(64, 256\)"):
        make_runner("gpt2", weights=transposed)
    neox = dict(hf_model("neox").state_dict())
    both_heads = {**neox, "embed_out.weight": neox["lm_head.weight"]}
    with pytest.raises(CheckpointError, match="both fill 'embed_out.weight'"):
        make_runner("neox", weights=both_heads)


def dense_alibi_attention(query, key, value, slopes, scale):
    """query [Q, H, D] at the last Q positions of key/value [S, KV, D] -> [Q, H, D], ALiBi and causal."""
    query_len, num_heads, _ = query.shape
    seq_len, num_kv_heads, _ = key.shape
    key = key.repeat_interleave(num_heads // num_kv_heads, dim=1)
    value = value.repeat_interleave(num_heads // num_kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query, key) * scale
    distance = torch.arange(seq_len)[None, :] - torch.arange(seq_len - query_len, seq_len)[:, None]  # [Q, S]
    scores = scores + slopes[:, None, None] * distance
    scores = scores.masked_fill(distance > 0, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), value)


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(6, 6), (8, 2)])
def test_paged_alibi_attention_matches_dense(block_size, num_heads, num_kv_heads):
    head_dim, gen = 8, torch.Generator().manual_seed(block_size)
    slopes = alibi_slopes(num_heads)
    free_blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    cache_shape = (NUM_BLOCKS, block_size, num_kv_heads, head_dim)
    # Garbage everywhere: whatever attention reads outside a sequence must be masked out.
    k_cache, v_cache = 1e3 * torch.randn(cache_shape, generator=gen), 1e3 * torch.randn(cache_shape, generator=gen)
    sequences, queries, new_keys, new_values, slot_mapping, expected = [], [], [], [], [], []
    for query_len, seq_len in [(1, 17), (11, 11), (1, 4), (5, 20), (1, 1)]:  # decodes, prefills, a chunk with context
        block_table = [free_blocks.pop() for _ in range(-(-seq_len // block_size))]
        slots = [block_table[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        key, value = (torch.randn(seq_len, num_kv_heads, head_dim, generator=gen) for _ in range(2))
        query = torch.randn(query_len, num_heads, head_dim, generator=gen)
        context = seq_len - query_len
        k_cache.view(-1, num_kv_heads, head_dim)[slots[:context]] = key[:context]
        v_cache.view(-1, num_kv_heads, head_dim)[slots[:context]] = value[:context]
        sequences.append(SequenceInput(query_len, seq_len, block_table, needs_sample=True))
        queries.append(query)
        new_keys.append(key[context:])
        new_values.append(value[context:])
        slot_mapping += slots[context:]
        expected.append(dense_alibi_attention(query, key, value, slopes, head_dim**-0.5))
    num_tokens = len(slot_mapping)
    metadata = AttentionMetadata.build(
        StepInput([0] * num_tokens, [0] * num_tokens, slot_mapping, sequences), block_size, "cpu"
    )
    reshape_and_cache(torch.cat(new_keys), torch.cat(new_values), k_cache, v_cache, metadata.slot_mapping)
    out = paged_attention(torch.cat(queries), k_cache, v_cache, metadata, head_dim**-0.5, alibi_slopes=slopes)
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_heads", [1, 2, 3, 5, 6, 8, 12, 16, 24, 40, 112])
def test_alibi_slopes_match_bloom(num_heads):
    # build_alibi_tensor gives slope * position; at position 1 that is the slope itself.
    bloom = transformers.models.bloom.modeling_bloom.build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)
    assert torch.equal(alibi_slopes(num_heads), bloom[:, 0, 1])
    assert alibi_slopes(num_heads)[0].item() == pytest.approx(2 ** (-8 / 2 ** math.floor(math.log2(num_heads))))


def test_pythia_style_config_reads_like_rope_parameters():
    pythia = {"hidden_size": 64, "num_attention_heads": 4, "rotary_pct": 0.25, "rotary_emb_base": 10000}
    current = {"rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"}}
    assert rotary_settings(pythia, 16) == rotary_settings(current, 16) == (4, 10000.0, None)


def test_registry_knows_the_gpt_family_by_architecture_and_model_type():
    assert set(ARCHITECTURES.values()) <= set(supported_architectures())
    for variant, architecture in ARCHITECTURES.items():
        config = hf_model(variant).config.to_dict()
        assert architecture_of(config) == architecture
        assert architecture_of({"model_type": config["model_type"]}) == architecture
    # GPT-2 and BLOOM config.json spell the sizes n_layer/n_head/n_embd.
    assert kv_cache_spec(hf_model("gpt2").config.to_dict()) == (2, 4, 16)
    assert kv_cache_spec(hf_model("bloom_6_heads").config.to_dict()) == (2, 6, 8)
