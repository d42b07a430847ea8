"""GGUF files (llama.cpp): metadata becomes a HF config, tensors are dequantized.

Only the llama architecture is read. Everything here reproduces what
transformers does when it loads a GGUF (`modeling_gguf_pytorch_utils`,
`integrations/ggml.py`), so a model built from our config and tensors equals
`AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)` bit for bit.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator

import numpy as np
import torch

from llmexec.errors import CheckpointError, UnsupportedArchitectureError
from llmexec.loader.checkpoint import Checkpoint, TensorSpec

# llama.* metadata key -> HF config key (transformers' GGUF_CONFIG_MAPPING["llama"]).
_LLAMA_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_TOKEN_ID_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}

# GGUF tensor name -> HF parameter name.
_WHOLE_MODEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp stores these for its own kernels; the HF model recomputes them
# from the config, and transformers skips them too.
_SKIPPED = {"rope_freqs.weight"}


class GGUFCheckpoint(Checkpoint):
    load_format = "gguf"

    def __init__(self, source: str):
        from gguf import GGUFReader  # deferred: only GGUF users pay for the import

        super().__init__(_find_gguf_file(source))
        try:
            self._reader = GGUFReader(self.source)
        except (ValueError, OSError) as error:
            raise CheckpointError(f"{self.source} is not a readable GGUF file: {error}") from error
        self._metadata = {name: field.contents() for name, field in self._reader.fields.items() if not _is_bulky(name)}
        architecture = self._metadata.get("general.architecture")
        if architecture != "llama":
            raise UnsupportedArchitectureError(
                f"{self.source} is a GGUF of architecture {architecture!r}; only 'llama' GGUF files are supported"
            )
        self.config = self._build_config()

    def _config_name(self) -> str:
        return f"the metadata of {self.source}"

    def _build_config(self) -> dict:
        config: dict = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
        for gguf_key, hf_key in _LLAMA_CONFIG_KEYS.items():
            if f"llama.{gguf_key}" in self._metadata:
                config[hf_key] = self._metadata[f"llama.{gguf_key}"]
        for gguf_key, hf_key in _TOKEN_ID_KEYS.items():
            if gguf_key in self._metadata:
                config[hf_key] = self._metadata[gguf_key]
        if "vocab_size" not in config and "tokenizer.ggml.tokens" in self._reader.fields:
            config["vocab_size"] = len(self._reader.fields["tokenizer.ggml.tokens"].data)
        # llama.cpp writes output.weight only when it differs from the embedding.
        config["tie_word_embeddings"] = all(tensor.name != "output.weight" for tensor in self._reader.tensors)
        return config

    def _hf_name(self, gguf_name: str) -> str | None:
        if gguf_name in _SKIPPED:
            return None
        if gguf_name in _WHOLE_MODEL_NAMES:
            return _WHOLE_MODEL_NAMES[gguf_name]
        match = _LAYER_TENSOR.fullmatch(gguf_name)
        if match is None or match.group(2) not in _LAYER_NAMES:
            raise CheckpointError(f"{self.source}: tensor {gguf_name} has no Hugging Face llama counterpart")
        layer, leaf, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[leaf]}.{kind}"

    def _entries(self) -> list[tuple[object, TensorSpec]]:
        """(GGUF reader tensor, HF spec) for every tensor the HF model uses."""
        entries = []
        for tensor in self._reader.tensors:
            name = self._hf_name(tensor.name)
            if name is not None:
                # GGUF lists dimensions fastest-first; torch wants them slowest-first.
                shape = tuple(int(size) for size in reversed(tensor.shape))
                entries.append((tensor, TensorSpec(name, shape, torch.float32, tensor.tensor_type.name)))
        return entries

    def _read_specs(self) -> list[TensorSpec]:
        return [spec for _, spec in self._entries()]

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for tensor, spec in self._entries():
            yield spec.name, self.dequantized(tensor, spec)

    def iter_stored(self) -> Iterator[tuple[TensorSpec, object]]:
        """(spec, the gguf reader's tensor: `.data` as stored, `.tensor_type`), in tensor_specs order,
        for readers that keep some blocks as they are (see `dequantized` and `unpermute_rows`)."""
        for tensor, spec in self._entries():
            yield spec, tensor

    def dequantized(self, tensor, spec: TensorSpec) -> torch.Tensor:
        """One reader tensor as float32 in HF shape and row order."""
        from gguf import dequantize

        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise CheckpointError(f"{self.source}: tensor {tensor.name}: {error}") from error
        if not values.flags.writeable:  # F32 comes back as a view of the read-only mapping
            values = values.copy()
        weights = torch.from_numpy(values.astype(np.float32, copy=False)).reshape(spec.shape)
        return self.unpermute_rows(spec.name, weights)

    def unpermute_rows(self, name: str, weights: torch.Tensor) -> torch.Tensor:
        """Undo the row interleave llama.cpp's converter applies to Q and K.

        llama.cpp reorders each head's rows from HF's "first half, second half"
        rotary layout to interleaved pairs; reversing it per head restores HF's.
        K uses the KV head count, as transformers' LlamaTensorProcessor does.
        Works on anything with one row per output row of `name` (weights, or
        per-row quantization components).
        """
        if ".self_attn.q_proj." in name:
            heads = self.config["num_attention_heads"]
        elif ".self_attn.k_proj." in name:
            heads = self.config.get("num_key_value_heads", self.config["num_attention_heads"])
        else:
            return weights
        rows = weights.shape[0]
        pairs = weights.reshape(heads, rows // heads // 2, 2, -1)
        return pairs.transpose(1, 2).reshape(weights.shape).contiguous()

    def tokenizer_files(self) -> dict[str, bytes]:
        if "tokenizer.ggml.model" not in self._reader.fields:
            return {}
        from transformers import AutoTokenizer

        # transformers owns the GGUF -> tokenizer conversion (vocab, merges,
        # special tokens, chat template); round-tripping through its
        # save_pretrained gives files any HF client loads the same way.
        folder, name = os.path.split(self.source)
        tokenizer = AutoTokenizer.from_pretrained(folder or ".", gguf_file=name)
        with tempfile.TemporaryDirectory(prefix="llmexec-tokenizer-") as saved:
            tokenizer.save_pretrained(saved)
            files = {}
            for file_name in sorted(os.listdir(saved)):
                with open(os.path.join(saved, file_name), "rb") as file:
                    files[file_name] = file.read()
        return files


def _find_gguf_file(source: str) -> str:
    if os.path.isfile(source):
        return source
    candidates = sorted(name for name in os.listdir(source) if name.endswith(".gguf"))
    if len(candidates) != 1:
        found = ", ".join(candidates) or "none"
        raise CheckpointError(f"{source} must hold exactly one .gguf file (found: {found}); pass the file itself")
    return os.path.join(source, candidates[0])


def _is_bulky(field_name: str) -> bool:
    # The vocabulary arrays run to tens of thousands of entries; the config
    # needs only their length.
    return field_name.startswith("tokenizer.ggml.") and field_name.split(".")[-1] in {
        "tokens",
        "token_type",
        "merges",
        "scores",
    }
