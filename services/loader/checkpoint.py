"""Opening a checkpoint: one interface over Hugging Face folders, GGUF files and dummy weights.

`open_checkpoint` picks a reader by load format; each reader lives in its own
module (`safetensors_checkpoint`, `torch_bin_checkpoint`, `gguf_checkpoint`,
`dummy_checkpoint`) and is imported only when used, so reading safetensors
never imports gguf. Every reader speaks Hugging Face parameter names and
shapes, so the rest of the loader never sees a GGUF name or a quantized block.
"""

from __future__ import annotations

import abc
import importlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmexec.errors import CheckpointError, InvalidArgumentError
from llmexec.loader.hf_cache import resolve_model_path

if TYPE_CHECKING:
    import torch

# load format -> (module, class); imported lazily like vLLM's model registry.
_READERS = {
    "safetensors": ("llmexec.loader.safetensors_checkpoint", "SafetensorsCheckpoint"),
    "pt": ("llmexec.loader.torch_bin_checkpoint", "TorchBinCheckpoint"),
    "gguf": ("llmexec.loader.gguf_checkpoint", "GGUFCheckpoint"),
    "dummy": ("llmexec.loader.dummy_checkpoint", "DummyCheckpoint"),
}
LOAD_FORMATS = ("auto", *_READERS)


class NoWeightsError(CheckpointError):
    """A folder with a config.json and no weight files: only load_format "dummy" can use it."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as `iter_tensors` will yield it, known without reading data.

    `dtype` is the torch dtype `iter_tensors` yields (float32 for every GGUF
    tensor, since they come out dequantized); `source_dtype` is how the file
    stores it ("BF16", "Q4_1", ...), for diagnostics.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source_dtype: str
    file: str = ""  # the file holding it, for error messages; "" when the checkpoint is one file


class Checkpoint(abc.ABC):
    """A model checkpoint on disk. Subclasses set `config` in `__init__`."""

    load_format: str
    source: str
    config: dict
    # Where iter_tensors should put its tensors when it can (safetensors reads, dummy
    # weights): the loader sets it to its device so GPU loads skip a host copy. Others
    # yield CPU tensors, which the store copies over.
    device: str = "cpu"

    def __init__(self, source: str):
        self.source = source

    @property
    def architecture(self) -> str:
        """The Hugging Face architecture name, e.g. "LlamaForCausalLM"."""
        architectures = self.config.get("architectures")
        if not architectures or not isinstance(architectures[0], str) or not architectures[0]:
            raise CheckpointError(
                f"{self._config_name()} has no `architectures` entry, so the model class is unknown; "
                'add e.g. "architectures": ["LlamaForCausalLM"] to it'
            )
        return architectures[0]

    def tensor_specs(self) -> list[TensorSpec]:
        """Every tensor's HF name, shape and dtype, from headers only.

        Raises CheckpointError when a shape disagrees with the config (a file
        that does not belong to this config.json would otherwise load and
        produce garbage, or fail deep inside a matmul).
        """
        specs = self._read_specs()
        for spec in specs:
            expected = expected_shape(self.config, spec.name)
            if expected is not None and expected != spec.shape:
                raise CheckpointError(
                    f"{spec.file or self.source}: tensor {spec.name} has shape {list(spec.shape)} but "
                    f"{self._config_name()} implies {list(expected)}; the weights and the config do not match"
                )
        return specs

    @abc.abstractmethod
    def _read_specs(self) -> list[TensorSpec]: ...

    @abc.abstractmethod
    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, tensor) one at a time, in `tensor_specs` order.

        Only one tensor (plus, for safetensors, one memory-mapped shard) is
        held at a time, so a caller that copies each one away keeps peak memory
        at one tensor.
        """

    @abc.abstractmethod
    def tokenizer_files(self) -> dict[str, bytes]:
        """File name -> content of a tokenizer `AutoTokenizer.from_pretrained`
        accepts from a folder holding just these files; {} when there is none."""

    def _config_name(self) -> str:
        return os.path.join(self.source, "config.json")


def open_checkpoint(path: str, load_format: str = "auto") -> Checkpoint:
    """Open a HF folder (config.json + safetensors or PyTorch .bin), a .gguf file,
    or a config.json alone with load_format "dummy".

    `path` may also be a Hugging Face model id ("org/name"), found offline in
    the local HF cache. `load_format` is one of LOAD_FORMATS. Nothing but
    headers and metadata is read here. Raises NotFoundError for a missing path
    or uncached id, InvalidArgumentError for an unknown format,
    CheckpointError when the path holds no checkpoint of that format.
    """
    path = resolve_model_path(os.fspath(path))
    if load_format == "auto":
        load_format = _detect_format(path)
    if load_format not in _READERS:
        raise InvalidArgumentError(
            f"unknown load_format {load_format!r}; use one of: {', '.join(LOAD_FORMATS)}"
        )
    module_name, class_name = _READERS[load_format]
    reader = getattr(importlib.import_module(module_name), class_name)
    return reader(path)


def _detect_format(path: str) -> str:
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf"
        if path.endswith(".json"):
            raise CheckpointError(f"{path} is a config alone; pass --load-format dummy for random weights of its shape")
        return "safetensors"
    names = set(os.listdir(path))
    if "config.json" not in names and any(name.endswith(".gguf") for name in names):
        return "gguf"
    # safetensors first, as transformers prefers it when a folder has both.
    if names & {"model.safetensors", "model.safetensors.index.json"}:
        return "safetensors"
    if names & {"pytorch_model.bin", "pytorch_model.bin.index.json"}:
        return "pt"
    if "config.json" in names:
        raise NoWeightsError(
            f"{path} has a config.json but no weights (model.safetensors, pytorch_model.bin or their "
            f"*.index.json; found: {', '.join(sorted(names))}); pass --load-format dummy for random weights"
        )
    return "safetensors"


# Llama-style decoders (the only family whose names these rules know) get
# their shapes checked against the config; other architectures are not.
_CHECKED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
_LAYER_TENSOR = re.compile(r"model\.layers\.\d+\.(.+)")


def expected_shape(config: dict, name: str) -> tuple[int, ...] | None:
    """The shape `config` implies for tensor `name`, or None when unknown."""
    architectures = config.get("architectures") or [None]
    if architectures[0] not in _CHECKED_ARCHITECTURES:
        return None
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        intermediate = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return None
    whole_model = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    if name in whole_model:
        return whole_model[name]
    match = _LAYER_TENSOR.fullmatch(name)
    if match is None:
        return None
    per_layer = {
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "self_attn.q_proj.bias": (heads * head_dim,),
        "self_attn.k_proj.bias": (kv_heads * head_dim,),
        "self_attn.v_proj.bias": (kv_heads * head_dim,),
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    return per_layer.get(match.group(1))
