"""Every load format: PyTorch .bin, GGUF tensor types, dummy weights, HF cache ids.

Each reader must yield Hugging Face names with the values the file holds:
.bin against the state dict that was saved, GGUF against an independent numpy
dequantization of the bytes written (tests/checkpoint_files.py).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from checkpoint_files import (
    REFERENCE_TYPES,
    gguf_name,
    llama_cpp_unpermute,
    put_in_hf_cache,
    reference_dequantize,
    save_torch_bin,
    write_llama_gguf,
)
from tiny_models import tiny_llama

from llmexec.errors import CheckpointError, InvalidArgumentError, NotFoundError
from llmexec.loader.checkpoint import open_checkpoint
from llmexec.loader.torch_bin_checkpoint import TorchBinCheckpoint


def tensors_of(checkpoint) -> dict[str, torch.Tensor]:
    specs = checkpoint.tensor_specs()
    tensors = dict(checkpoint.iter_tensors())
    assert [spec.name for spec in specs] == list(tensors)
    for spec in specs:
        assert (spec.shape, spec.dtype) == (tuple(tensors[spec.name].shape), tensors[spec.name].dtype), spec.name
    return tensors


# --- PyTorch .bin ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.mark.parametrize("num_shards", [1, 3])
def test_torch_bin_equals_the_saved_state_dict(tiny, tmp_path, num_shards):
    save_torch_bin(tiny, tmp_path, num_shards)
    checkpoint = open_checkpoint(str(tmp_path))  # auto-detected
    assert checkpoint.load_format == "pt"
    assert checkpoint.architecture == "LlamaForCausalLM"
    tensors = tensors_of(checkpoint)
    expected = tiny.state_dict()
    assert set(tensors) == set(expected)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, expected[name]), name


def test_torch_bin_is_memory_mapped_not_read(tiny, tmp_path):
    save_torch_bin(tiny, tmp_path)
    [(name, tensor)] = [next(iter(open_checkpoint(str(tmp_path), "pt").iter_tensors()))]
    path = str(tmp_path / "pytorch_model.bin")
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if line.rstrip().endswith(path)]
    assert mapped, f"{path} is not mapped while its tensor {name} is alive"
    del tensor


class Payload:
    """Unpickling this would run os.system: weights_only must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_torch_bin_never_unpickles_arbitrary_objects(tiny, tmp_path):
    save_torch_bin(tiny, tmp_path)
    bad = tiny.state_dict() | {"extra": Payload()}
    torch.save(bad, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never unpickled"):
        open_checkpoint(str(tmp_path)).tensor_specs()
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_truncated_torch_bin_names_the_file(tiny, tmp_path):
    save_torch_bin(tiny, tmp_path, num_shards=2)
    shard = tmp_path / "pytorch_model-00002-of-00002.bin"
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=f"{shard}.*truncated or corrupt"):
        open_checkpoint(str(tmp_path)).tensor_specs()


def test_torch_bin_shard_lacking_an_indexed_tensor_names_both(tiny, tmp_path):
    save_torch_bin(tiny, tmp_path, num_shards=2)
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "pytorch_model-00001-of-00002.bin"
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    state_dict = torch.load(tmp_path / "pytorch_model-00001-of-00002.bin", weights_only=True)
    if "model.norm.weight" in state_dict:  # make sure the index is the one that is wrong
        del state_dict["model.norm.weight"]
        torch.save(state_dict, tmp_path / "pytorch_model-00001-of-00002.bin")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*pytorch_model-00001-of-00002\.bin"):
        TorchBinCheckpoint(str(tmp_path)).tensor_specs()


def test_safetensors_is_preferred_when_a_folder_has_both(tiny, tmp_path):
    save_torch_bin(tiny, tmp_path)
    tiny.save_pretrained(tmp_path)
    assert open_checkpoint(str(tmp_path)).load_format == "safetensors"
    assert open_checkpoint(str(tmp_path), "pt").load_format == "pt"


# --- GGUF tensor types ------------------------------------------------------------

# Rows of 256 values: K-quant super-blocks are 256 wide.
GGUF_LLAMA = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def gguf_llama():
    model = tiny_llama(**GGUF_LLAMA)
    return GGUF_LLAMA, {name: tensor for name, tensor in model.state_dict().items()}


def test_gguf_f32_round_trips_exactly_q_k_order_included(gguf_llama, tmp_path):
    config, state_dict = gguf_llama
    write_llama_gguf(tmp_path / "m.gguf", config, state_dict, "F32")
    tensors = tensors_of(open_checkpoint(str(tmp_path / "m.gguf")))
    assert set(tensors) == set(state_dict)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, state_dict[name]), name


@pytest.mark.parametrize("qtype", REFERENCE_TYPES)
def test_gguf_types_dequantize_like_an_independent_reference(gguf_llama, tmp_path, qtype):
    config, state_dict = gguf_llama
    written = write_llama_gguf(tmp_path / "m.gguf", config, state_dict, qtype)
    checkpoint = open_checkpoint(str(tmp_path / "m.gguf"))
    specs = {spec.name: spec for spec in checkpoint.tensor_specs()}
    assert specs["model.layers.0.mlp.up_proj.weight"].source_dtype == qtype
    tensors = tensors_of(checkpoint)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for hf_name, tensor in tensors.items():
        raw = written[gguf_name(hf_name)]
        expected = reference_dequantize(raw, qtype).reshape(tuple(state_dict[hf_name].shape))
        for projection, count in heads.items():
            if f".{projection}." in hf_name:
                expected = llama_cpp_unpermute(expected, count)
        np.testing.assert_allclose(tensor.numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=hf_name)
        if qtype in ("Q8_0", "Q4_0", "Q4_1", "F16", "BF16"):  # quantized from the model: near its values
            tolerance = {"Q8_0": 0.02, "F16": 1e-3, "BF16": 1e-2}.get(qtype, 0.3)
            assert (tensor - state_dict[hf_name]).abs().max() < tolerance * state_dict[hf_name].abs().max(), hf_name


def test_gguf_unknown_tensor_type_names_the_file(gguf_llama, tmp_path):
    config, state_dict = gguf_llama
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, config, state_dict, "Q8_0")
    data = bytearray(path.read_bytes())
    # The tensor infos: name, n_dims (u32), dims (u64 each), type (u32), offset (u64).
    name = b"blk.0.ffn_up.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8
    assert int.from_bytes(data[at : at + 4], "little") == 8  # Q8_0
    data[at : at + 4] = (250).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}"):
        open_checkpoint(str(path)).tensor_specs()


# --- dummy weights ------------------------------------------------------------------


def test_dummy_weights_have_the_checkpoint_names_shapes_and_dtypes(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "real")
    config = json.loads((tmp_path / "real" / "config.json").read_text())
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(config))
    real = tensors_of(open_checkpoint(str(tmp_path / "real")))
    for source in (tmp_path / "cfg", tmp_path / "cfg" / "config.json", tmp_path / "real"):
        dummy = open_checkpoint(str(source), "dummy")
        assert dummy.load_format == "dummy"
        tensors = tensors_of(dummy)
        assert {name: (t.shape, t.dtype) for name, t in tensors.items()} == {
            name: (t.shape, t.dtype) for name, t in real.items()
        }
    again = dict(open_checkpoint(str(tmp_path / "cfg"), "dummy").iter_tensors())
    assert all(torch.equal(again[name], tensors[name]) for name in tensors)  # reproducible
    up = tensors["model.layers.0.mlp.up_proj.weight"].float()
    assert 0.015 < up.std() < 0.025 and torch.equal(tensors["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))


def test_a_config_alone_without_dummy_says_to_use_dummy(tmp_path):
    tiny_llama().config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights.*dummy"):
        open_checkpoint(str(tmp_path))


def test_unknown_load_format_lists_the_known_ones(tmp_path):
    with pytest.raises(InvalidArgumentError, match="safetensors, pt, gguf, dummy"):
        open_checkpoint(str(tmp_path), "npcache")


# --- Hugging Face model ids, offline ----------------------------------------------------


def test_model_id_resolves_from_the_hf_cache(tiny, tmp_path, monkeypatch):
    tiny.save_pretrained(tmp_path / "saved")
    snapshot = put_in_hf_cache(tmp_path / "saved", tmp_path / "hf", "acme/tiny-llama")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    checkpoint = open_checkpoint("acme/tiny-llama")
    assert checkpoint.source == str(snapshot)
    assert set(tensors_of(checkpoint)) == set(tiny.state_dict())
    assert open_checkpoint("acme/tiny-llama@main").source == str(snapshot)
    shutil.rmtree(tmp_path / "hf" / "hub" / "models--acme--tiny-llama" / "refs")  # no ref: the one snapshot
    assert open_checkpoint("acme/tiny-llama").source == str(snapshot)


def test_model_id_not_in_the_cache_is_not_found_saying_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotFoundError) as error:
        open_checkpoint("acme/absent-model")
    message = str(error.value)
    assert "models--acme--absent-model" in message and str(tmp_path / "cache") in message
    assert "never downloads" in message
