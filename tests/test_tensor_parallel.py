"""Tensor parallelism on the CPU: the loader's per-rank shards, and TP=2 (two processes, gloo) against TP=1.

The distributed tests form one process group for the module: this pytest process
is rank 0 (a TensorParallelModelRunner, as in the runner service) and one
`python -m llmexec.runner.tp_worker` process is rank 1. Each tiny checkpoint,
written by transformers, is loaded by the real loader split in two (one
shared-memory file per rank); both ranks attach and run the same steps, and the
logits must match the unsplit runner within 1e-4 with identical greedy tokens
(and transformers itself).
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from paged_harness import (
    NUM_BLOCKS,
    Sequence,
    assert_close_relative,
    check_prefill_then_decode,
    fused_weights,
    hf_reference,
    make_step,
    random_prompt,
    shuffled_blocks,
)
from tiny_models import TINY_LLAMA as TINY

from llmexec.errors import InvalidArgumentError
from llmexec.loader.checkpoint import open_checkpoint
from llmexec.loader.model_inspector import inspect_model
from llmexec.loader.model_store import ModelStore
from llmexec.loader.shm_store import SHM_DIR
from llmexec.loader.tp_plan import shard_plans
from llmexec.loader.weight_plan import materialize, plan_weights, specs_of
from llmexec.models.registry import architecture_of, model_class_for
from llmexec.models.tensor_parallel import plan_for
from llmexec.runner.model_runner import ModelRunner
from llmexec.runner.tp_runner import TensorParallelModelRunner
from llmexec.runner.tp_worker import WorkerRanks

BLOCK_SIZE = 4
NEOX_VOCAB = 251  # odd: rank 1's vocabulary slice is one row of padding short
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),  # 4 heads, 2 KV heads (GQA)
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),  # q/k/v bias, tied head
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=NEOX_VOCAB,
        max_position_embeddings=256, rotary_pct=0.25,
    ),
    "mixtral": lambda: transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
}


def hf_model(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def rank_weights(model: torch.nn.Module, size: int) -> list[dict[str, torch.Tensor]]:
    """transformers' state dict cut as the loader cuts it for `size` ranks."""
    config = model.config.to_dict()
    model_class = model_class_for(architecture_of(config), config)
    state_dict = model.state_dict()
    plans = shard_plans(plan_weights(model_class, config, specs_of(state_dict)), plan_for(model_class, config, size),
                        size)
    return [materialize(plan, state_dict) for plan in plans]


# ---- the per-rank plans (no processes) -------------------------------------------------------------


def test_fused_qkv_is_split_per_part_by_heads_and_kv_heads_replicate_beyond_their_count():
    model = hf_model("llama")  # 4 heads, 2 KV heads, head_dim 16
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    for size in (2, 4):
        heads_per_rank = 4 // size
        for rank, weights in enumerate(rank_weights(model, size)):
            kv_head = rank * 2 // size  # size 4: ranks 0, 1 read KV head 0; ranks 2, 3 KV head 1
            kv_rows = slice(kv_head * 16, (kv_head + (1 if size == 4 else 2 // size)) * 16)
            expected = torch.cat((q[rank * heads_per_rank * 16 : (rank + 1) * heads_per_rank * 16], k[kv_rows],
                                  v[kv_rows]))
            assert torch.equal(weights["model.layers.0.self_attn.qkv_proj.weight"], expected), (size, rank)
            o_proj = model.model.layers[0].self_attn.o_proj.weight
            cols = slice(rank * heads_per_rank * 16, (rank + 1) * heads_per_rank * 16)
            assert torch.equal(weights["model.layers.0.self_attn.o_proj.weight"], o_proj[:, cols])
            gate = model.model.layers[0].mlp.gate_proj.weight[rank * 128 // size : (rank + 1) * 128 // size]
            up = model.model.layers[0].mlp.up_proj.weight[rank * 128 // size : (rank + 1) * 128 // size]
            assert torch.equal(weights["model.layers.0.mlp.gate_up_proj.weight"], torch.cat((gate, up)))


def test_checkpoint_fused_qkv_splits_like_its_parts():
    """Phi-3 ships qkv_proj fused: each rank gets the same rows as from separate q/k/v."""
    llama = hf_model("llama")
    fused_state = {
        name.replace("self_attn.q_proj", "self_attn.qkv_proj"): (
            torch.cat([llama.state_dict()[name.replace("q_proj", part)] for part in ("q_proj", "k_proj", "v_proj")])
            if "q_proj" in name else tensor
        )
        for name, tensor in llama.state_dict().items()
        if "k_proj" not in name and "v_proj" not in name
    }
    config = llama.config.to_dict()
    model_class = model_class_for("LlamaForCausalLM")
    for rank, expected in enumerate(rank_weights(llama, 2)):
        plan = shard_plans(plan_weights(model_class, config, specs_of(fused_state)), plan_for(model_class, config, 2),
                           2)[rank]
        got = materialize(plan, fused_state)
        assert torch.equal(got["model.layers.1.self_attn.qkv_proj.weight"],
                           expected["model.layers.1.self_attn.qkv_proj.weight"])


def test_vocabulary_is_padded_and_row_parallel_bias_is_added_once():
    model = hf_model("gpt_neox")
    embed = model.gpt_neox.embed_in.weight
    dense_bias = model.gpt_neox.layers[0].attention.dense.bias
    first, second = rank_weights(model, 2)
    assert torch.equal(first["gpt_neox.embed_in.weight"], embed[:126])
    assert torch.equal(second["gpt_neox.embed_in.weight"][:125], embed[126:])
    assert not second["gpt_neox.embed_in.weight"][125].any()
    assert torch.equal(first["gpt_neox.layers.0.attention.dense.bias"], dense_bias)
    assert not second["gpt_neox.layers.0.attention.dense.bias"].any()
    qkv = model.gpt_neox.layers[0].attention.query_key_value.weight  # rows [heads, 3, head_dim]: heads 2, 3
    assert torch.equal(second["gpt_neox.layers.0.attention.query_key_value.weight"], qkv[2 * 48 :])


def test_sizes_that_do_not_split_the_model_are_refused(tmp_path):
    llama_class = model_class_for("LlamaForCausalLM")
    config = hf_model("llama").config.to_dict()
    with pytest.raises(InvalidArgumentError, match="does not divide the 4 attention heads; use one of 1, 2, 4"):
        plan_for(llama_class, config, 3)
    with pytest.raises(InvalidArgumentError, match="neither divides the 6 KV heads nor is a multiple of them"):
        plan_for(llama_class, {**config, "num_attention_heads": 12, "num_key_value_heads": 6, "head_dim": 8}, 4)
    with pytest.raises(InvalidArgumentError, match="not supported for GPT2LMHeadModel"):
        plan_for(model_class_for("GPT2LMHeadModel"), {"n_head": 4, "n_embd": 64}, 2)
    hf_model("llama").save_pretrained(tmp_path)
    before = set(os.listdir(SHM_DIR))
    with pytest.raises(InvalidArgumentError, match="does not divide the 4 attention heads"):
        ModelStore().load(str(tmp_path), tensor_parallel_size=3)
    assert set(os.listdir(SHM_DIR)) == before  # nothing left in shared memory


def test_inspect_sizes_one_rank(tmp_path):
    model = hf_model("mixtral")
    model.save_pretrained(tmp_path)
    report = inspect_model(str(tmp_path), kv_cache_dtype="float32", memory_bytes=10**7, tensor_parallel_size=2)
    replicated = sum(p.numel() for name, p in model.named_parameters() if "norm" in name or "mlp.gate." in name)
    assert report.rank_parameter_count == (report.parameter_count - replicated) // 2 + replicated
    assert report.rank_kv_cache_bytes_per_token == report.kv_cache_bytes_per_token // 2  # 2 KV heads, 1 per rank
    assert report.rank_footprints[0].weight_bytes == report.rank_parameter_count * 4
    checkpoint = open_checkpoint(str(tmp_path))
    shard = rank_weights(model, 2)[1]
    assert sum(t.numel() for t in shard.values()) == report.rank_parameter_count
    assert checkpoint.architecture == "MixtralForCausalLM"


# ---- TP=2 in two processes against TP=1 ------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks():
    group = WorkerRanks.start(2, "cpu", threads=1)
    yield group
    group.close()


@pytest.fixture(scope="module", params=list(CONFIGS))
def split_model(request, ranks, tmp_path_factory):
    """(transformers' model, TP=1 runner, TP=2 runner), the TP=2 shards loaded by the loader."""
    model = hf_model(request.param)
    folder = tmp_path_factory.mktemp(f"tp-{request.param}")
    model.save_pretrained(folder)
    store = ModelStore()
    try:
        loaded = store.load(str(folder), tensor_parallel_size=2)
        assert loaded.tensor_parallel_size == 2
        config = loaded.config
        split = TensorParallelModelRunner.create(ranks, config, [w.layout for w in loaded.rank_weights], NUM_BLOCKS,
                                                 BLOCK_SIZE)
        whole = ModelRunner(config, fused_weights(config, model.state_dict()), NUM_BLOCKS, BLOCK_SIZE)
        yield model, whole, split
    finally:
        store.close()


def test_tp2_matches_tp1_and_transformers_token_by_token(split_model):
    model, whole, split = split_model
    vocab = model.config.vocab_size
    check_prefill_then_decode(split, hf_reference(model), random_prompt(11, seed=3, vocab_size=vocab), steps=12)
    # A mixed batch (prefills beside decodes, a prompt in two chunks) on both runners, step by step.
    free_whole, free_split = shuffled_blocks(seed=5), shuffled_blocks(seed=5)
    pairs = [
        (Sequence(prompt, free_whole, BLOCK_SIZE), Sequence(prompt, free_split, BLOCK_SIZE))
        for prompt in (random_prompt(n, seed=n, vocab_size=vocab) for n in (9, 17, 5))
    ]
    schedule = [[(0, None), (1, 8)], [(0, None), (1, None), (2, None)]] + [[(0, None), (1, None), (2, None)]] * 6
    reference = hf_reference(model)
    for chunks in schedule:
        steps = [make_step([pairs[i][side].chunk(query_len) for i, query_len in chunks]) for side in (0, 1)]
        sampled = [i for (i, _), seq in zip(chunks, steps[0].sequences) if seq.needs_sample]
        expected, got = whole.execute_logits(steps[0]), split.execute_logits(steps[1])
        assert got.shape == expected.shape == (len(sampled), vocab)
        assert (got - expected).abs().max().item() <= 1e-4
        tokens = split.execute_step(steps[1]).sampled_token_ids  # the same step again: same K/V rewritten
        assert tokens == expected.argmax(-1).tolist()
        for row, (i, token) in enumerate(zip(sampled, tokens)):
            assert_close_relative(got[row], reference(pairs[i][1].token_ids))
            for seq in pairs[i]:
                seq.token_ids.append(token)
    assert len(pairs[1][1].token_ids) == 17 + 7


def test_int4_shards_split_by_groups_and_match_unsplit_int4(ranks, tmp_path):
    """int4 (group 32): each rank's down_proj holds half the groups; group 48 (3 groups over 128
    inputs, the last described by g_idx) cannot be split by input columns and is refused."""
    from llmexec.runner.weight_attach import attach_weights

    hf_model("llama").save_pretrained(tmp_path)
    store = ModelStore()
    try:
        whole = store.load(str(tmp_path), quantization="int4", quantization_group_size=32)
        split = store.load(str(tmp_path), quantization="int4", quantization_group_size=32, tensor_parallel_size=2)
        shard = attach_weights(split.rank_weights[1].layout)
        assert shard["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 2)  # 128 inputs / 2 ranks / 32
        split_runner = TensorParallelModelRunner.create(ranks, split.config, [w.layout for w in split.rank_weights],
                                                        NUM_BLOCKS, BLOCK_SIZE)
        whole_runner = ModelRunner(whole.config, attach_weights(whole.weights.layout), NUM_BLOCKS, BLOCK_SIZE)
        sequences = [Sequence(random_prompt(10, seed=4, vocab_size=256), shuffled_blocks(), BLOCK_SIZE) for _ in "ab"]
        for _ in range(4):
            expected = whole_runner.execute_logits(make_step([sequences[0].chunk()]))
            got = split_runner.execute_logits(make_step([sequences[1].chunk()]))
            assert (got - expected).abs().max().item() <= 1e-4
            for seq in sequences:
                seq.token_ids.append(int(expected.argmax()))
        with pytest.raises(InvalidArgumentError, match=r"down_proj.*(cannot split the last dim|g_idx)"):
            store.load(str(tmp_path), quantization="int4", quantization_group_size=48, tensor_parallel_size=2)
    finally:
        store.close()
