"""The weight-loading analyzer (`llmexec inspect`): exact counts from a config or a checkpoint,
checked against published figures and against the demo GGUF's own tensors read with gguf."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from tiny_models import tiny_llama
from transformers import LlamaConfig

from llmexec.demo_model import demo_model_path
from llmexec.errors import InvalidArgumentError, NotFoundError
from llmexec.loader.model_inspector import inspect_model, layer_type

# meta-llama/Llama-2-7b-hf's config.json, whose model card says 7B and whose
# safetensors index holds 6,738,415,616 parameters.
LLAMA_2_7B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="float16")


def run_cli(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "llmexec", "inspect", *args, "--json"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_llama_2_7b_config_alone_gives_its_exact_parameter_count(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_2_7B))
    report = run_cli(str(tmp_path / "config.json"), "--memory", "24GiB")
    assert report["parameter_count"] == 6_738_415_616
    assert report["parameter_source"] == "config"
    groups = {g["layer_type"]: g["parameter_count"] for g in report["parameter_groups"]}
    hidden, inter, layers, vocab = 4096, 11008, 32, 32000
    assert groups == {
        "attention": layers * 4 * hidden * hidden,
        "mlp": layers * 3 * hidden * inter,
        "norm": (2 * layers + 1) * hidden,
        "embedding": vocab * hidden,
        "lm_head": vocab * hidden,
    }
    assert math.isclose(sum(g["share"] for g in report["parameter_groups"]), 1.0)
    # K and V, 32 layers, 32 KV heads of 128, bf16: 512 KiB a token.
    assert report["kv_cache_bytes_per_token"] == 2 * 32 * 32 * 128 * 2 == 524_288
    rows = {row["precision"]: row for row in report["footprints"]}
    assert rows["bfloat16"]["weight_bytes"] == 2 * 6_738_415_616
    assert rows["int4"]["weight_bytes"] == 6_738_415_616 // 2
    assert rows["float32"]["kv_cache_tokens"] == 0  # 25.1 GiB of weights do not fit in 24 GiB
    assert rows["bfloat16"]["kv_cache_tokens"] == (24 * 2**30 - 2 * 6_738_415_616) // 524_288


def test_config_only_counts_gqa_and_tied_heads_exactly(tmp_path):
    # Llama-3.2-1B: GQA (8 KV heads of 64) and a tied head; 1,235,814,400 parameters.
    config = dict(LLAMA_2_7B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                  tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    report = inspect_model(str(tmp_path))  # a folder holding only config.json
    assert report.parameter_count == 1_235_814_400
    assert "lm_head" not in {g.layer_type for g in report.parameter_groups}
    assert report.kv_cache_bytes_per_token == 2 * 16 * 8 * 64 * 2


def test_demo_model_figures_match_its_real_tensors():
    from gguf import GGUFReader

    reader = GGUFReader(str(demo_model_path()))
    by_type: dict[str, int] = {}
    for tensor in reader.tensors:  # GGUF names, read without our reader
        name = tensor.name
        kind = ("norm" if name.endswith("norm.weight") else "embedding" if name.startswith("token_embd")
                else "attention" if ".attn_" in name else "mlp" if ".ffn_" in name else name)
        by_type[kind] = by_type.get(kind, 0) + int(tensor.n_elements)
    field = lambda key: int(reader.fields[key].contents())
    kv_per_token = 2 * field("llama.block_count") * field("llama.attention.head_count_kv") * (
        field("llama.embedding_length") // field("llama.attention.head_count")) * 4

    report = inspect_model(str(demo_model_path()), memory_bytes=2**30, kv_cache_dtype="float32")
    assert report.parameter_source == "checkpoint" and report.load_format == "gguf"
    assert report.parameter_count == sum(by_type.values()) == 134_515_008
    assert {g.layer_type: g.parameter_count for g in report.parameter_groups} == by_type
    assert report.kv_cache_bytes_per_token == kv_per_token
    for row in report.footprints:
        width = {"float32": 4, "bfloat16": 2, "float8": 1, "int8": 1, "int4": 0.5}[row.precision]
        assert row.weight_bytes == math.ceil(width * report.parameter_count)
        assert row.kv_cache_tokens == (2**30 - row.weight_bytes) // kv_per_token

    # Its metadata alone, built as a config, gives the same count (tied head and all).
    from llmexec.loader.checkpoint import open_checkpoint
    from llmexec.loader.config_tensors import config_tensor_specs

    config = open_checkpoint(str(demo_model_path())).config
    assert sum(math.prod(spec.shape) for spec in config_tensor_specs(config)) == report.parameter_count


def test_checkpoint_count_equals_the_state_dict(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    report = inspect_model(str(tmp_path))
    assert report.load_format == "safetensors" and report.parameter_source == "checkpoint"
    assert report.parameter_count == sum(p.numel() for p in model.parameters())
    assert LlamaConfig(**json.loads((tmp_path / "config.json").read_text())).num_hidden_layers == report.num_layers


@pytest.mark.parametrize(
    "name, kind",
    [
        ("model.layers.0.self_attn.q_proj.weight", "attention"),
        ("model.layers.0.self_attn.q_norm.weight", "norm"),
        ("transformer.h.0.attn.c_attn.weight", "attention"),
        ("transformer.h.0.ln_1.weight", "norm"),
        ("transformer.wpe.weight", "embedding"),
        ("transformer.word_embeddings_layernorm.weight", "norm"),
        ("gpt_neox.layers.0.attention.query_key_value.weight", "attention"),
        ("embed_out.weight", "lm_head"),
        ("model.decoder.layers.0.fc1.weight", "mlp"),
        ("model.layers.0.block_sparse_moe.gate.weight", "router"),
        ("model.layers.0.block_sparse_moe.experts.3.w1.weight", "mlp"),
        ("model.layers.0.mlp.gate_proj.weight", "mlp"),
        ("score.weight", "other"),
    ],
)
def test_layer_types_of_common_architectures(name, kind):
    assert layer_type(name) == kind


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(NotFoundError):
        inspect_model(str(tmp_path / "absent"))
    with pytest.raises(InvalidArgumentError, match="kv_cache_dtype"):
        inspect_model(str(demo_model_path()), kv_cache_dtype="int3")
