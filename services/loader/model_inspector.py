"""The weight-loading analyzer: what a model's parameters are, and what memory they and the KV cache need.

Counts are exact: from the checkpoint's own tensors when there are weights,
otherwise from the architecture built on the "meta" device from the config
(config_tensors), which knows norms, GQA-sized K/V, biases and whether the
head is tied. Nothing is loaded or allocated.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from llmexec.errors import InvalidArgumentError
from llmexec.loader.checkpoint import NoWeightsError, TensorSpec, open_checkpoint
from llmexec.loader.config_tensors import config_tensor_specs
from llmexec.loader.hf_cache import resolve_model_path
from llmexec.loader.hf_folder import read_json
from llmexec.models.registry import architecture_of
from llmexec.runner.model_runner import kv_cache_spec

# Every parameter stored at this many bytes (scales and zero points of real
# quantization schemes come on top; see the README's accuracy table).
PRECISION_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float8": 1.0, "int8": 1.0, "int4": 0.5}
KV_CACHE_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}

# First match wins: norms before embeddings (BLOOM's word_embeddings_layernorm is a norm).
LAYER_TYPES = (
    ("norm", re.compile(r"(^|\.)[^.]*(norm|ln)[^.]*\.", re.IGNORECASE)),
    ("lm_head", re.compile(r"(^|\.)(lm_head|embed_out)\.")),
    ("embedding", re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|embed_in|embed_positions)\.")),
    ("router", re.compile(r"(^|\.)(block_sparse_moe|mlp)\.(gate|router)\.")),
    ("attention", re.compile(r"(^|\.)(self_attn|attn|attention|self_attention)\.")),
    ("mlp", re.compile(r"(^|\.)(mlp|feed_forward|block_sparse_moe|ffn|fc1|fc2)[.]")),
)


@dataclass(frozen=True)
class ParameterGroup:
    layer_type: str
    parameter_count: int
    share: float  # of all parameters


@dataclass(frozen=True)
class PrecisionFootprint:
    precision: str  # a PRECISION_BYTES key
    weight_bytes: int
    kv_cache_tokens: int  # tokens of KV cache that fit in memory_bytes after the weights; 0 if none


@dataclass
class ModelReport:
    source: str
    architecture: str
    parameter_source: str  # "checkpoint" or "config"
    load_format: str  # the checkpoint's; "config" when counted from the config
    parameter_count: int
    parameter_groups: list[ParameterGroup]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_cache_dtype: str
    kv_cache_bytes_per_token: int
    memory_bytes: int
    footprints: list[PrecisionFootprint] = field(default_factory=list)
    # One rank of the model split over tensor_parallel_size ranks (all ranks hold the same sizes).
    tensor_parallel_size: int = 1
    rank_parameter_count: int = 0
    rank_kv_cache_bytes_per_token: int = 0
    rank_footprints: list[PrecisionFootprint] = field(default_factory=list)


def layer_type(name: str) -> str:
    """The layer type an HF tensor name belongs to (see LAYER_TYPES), "other" if none."""
    for kind, pattern in LAYER_TYPES:
        if pattern.search(name):
            return kind
    return "other"


def inspect_model(
    model: str, load_format: str = "auto", memory_bytes: int = 0, kv_cache_dtype: str = "bfloat16",
    tensor_parallel_size: int = 1,
) -> ModelReport:
    """Report on a HF folder, .gguf file, config.json alone, or cached model id, without loading it.

    A folder with a config.json but no weights, or load_format "dummy", is
    counted from the config. tensor_parallel_size > 1 adds what one rank holds
    (memory_bytes then being one device's). Raises InvalidArgumentError for an
    unknown kv_cache_dtype, negative memory_bytes or a size the model does not
    split by, and what open_checkpoint raises.
    """
    kv_cache_dtype = kv_cache_dtype or "bfloat16"
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise InvalidArgumentError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if memory_bytes < 0:
        raise InvalidArgumentError(f"memory_bytes must be >= 0, got {memory_bytes}")
    source = resolve_model_path(model)
    config, specs, load_format = _config_and_specs(source, load_format or "auto")
    num_layers, num_kv_heads, head_dim = kv_cache_spec(config)
    kv_bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * KV_CACHE_DTYPES[kv_cache_dtype]
    counts: dict[str, int] = {}
    for spec in specs:
        kind = layer_type(spec.name)
        counts[kind] = counts.get(kind, 0) + math.prod(spec.shape)
    total = sum(counts.values())
    groups = [ParameterGroup(kind, count, count / total) for kind, count in sorted(counts.items(), key=lambda kv: -kv[1])]
    footprints = _footprints(total, kv_bytes_per_token, memory_bytes)
    rank = {}
    if tensor_parallel_size > 1:
        rank_parameters, rank_kv_heads = _rank_sizes(config, tensor_parallel_size)
        rank_kv_bytes = kv_bytes_per_token // num_kv_heads * rank_kv_heads
        rank = dict(tensor_parallel_size=tensor_parallel_size, rank_parameter_count=rank_parameters,
                    rank_kv_cache_bytes_per_token=rank_kv_bytes,
                    rank_footprints=_footprints(rank_parameters, rank_kv_bytes, memory_bytes))
    return ModelReport(
        source=source,
        architecture=architecture_of(config),
        parameter_source="config" if load_format == "config" else "checkpoint",
        load_format=load_format,
        parameter_count=total,
        parameter_groups=groups,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        kv_cache_dtype=kv_cache_dtype,
        kv_cache_bytes_per_token=kv_bytes_per_token,
        memory_bytes=memory_bytes,
        footprints=footprints,
        **rank,
    )


def _footprints(parameters: int, kv_bytes_per_token: int, memory_bytes: int) -> list[PrecisionFootprint]:
    footprints = []
    for precision, width in PRECISION_BYTES.items():
        weight_bytes = math.ceil(parameters * width)
        fit = (memory_bytes - weight_bytes) // kv_bytes_per_token if memory_bytes > weight_bytes else 0
        footprints.append(PrecisionFootprint(precision, weight_bytes, fit))
    return footprints


def _rank_sizes(config: dict, size: int) -> tuple[int, int]:
    """(parameters one rank holds, its KV heads): the model's parameters, built on "meta",
    each cut as the loader cuts it (llmexec.models.tensor_parallel)."""
    from llmexec.models.config_keys import standard_config
    from llmexec.models.registry import model_class_for
    from llmexec.models.tensor_parallel import plan_for, rank_config, rank_shape, split_of

    config = standard_config(config)
    model_class = model_class_for(architecture_of(config), config)
    splits = plan_for(model_class, config, size)
    parameters = 0
    for name, parameter in model_class(config).named_parameters():
        parameters += math.prod(rank_shape(tuple(parameter.shape), *split_of(splits, name), size))
    return parameters, rank_config(config, size)["num_key_value_heads"]


def _config_and_specs(source: str, load_format: str) -> tuple[dict, list[TensorSpec], str]:
    """(config, tensor specs, load format): "config" when counted from the config."""
    if not source.endswith(".json") and load_format != "dummy":
        try:
            checkpoint = open_checkpoint(source, load_format)
            return checkpoint.config, checkpoint.tensor_specs(), checkpoint.load_format
        except NoWeightsError:
            pass  # a folder holding only config.json: count from the config
    config_path = source if source.endswith(".json") else os.path.join(source, "config.json")
    config = read_json(config_path, what="config.json")
    return config, config_tensor_specs(config), "config"
