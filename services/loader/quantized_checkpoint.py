"""`--quantization`: a checkpoint seen through a quantizer, before the weight plan and the shm store.

Each wrapper yields, in place of a linear layer's `<module>.weight`, its int4 /
int8 / fp8 components (`<module>.weight_q`, `.weight_scale`, ...; see
llmexec.quantization), computed tensor by tensor while streaming. Every
component is per output row, so the weight plan fuses q/k/v and gate/up
components by stacking rows as it would the weights, and nothing downstream
changes. Other floating tensors are cast to the load dtype here, so the store
copies every tensor as it comes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from llmexec.errors import CheckpointError, InvalidArgumentError
from llmexec.loader.checkpoint import Checkpoint, TensorSpec
from llmexec.loader.weight_plan import plan_weights
from llmexec.quantization import CODES, G_IDX, OFFSET, QUANTIZATIONS, SCALE
from llmexec.quantization.fp8 import quantize_fp8
from llmexec.quantization.gguf_q4 import BLOCK_LAYOUT, gguf_q4_components
from llmexec.quantization.gptq_awq import awq_components, awq_shapes, gptq_components, gptq_shapes
from llmexec.quantization.int4 import DEFAULT_GROUP_SIZE, quantize_int4
from llmexec.quantization.int8 import quantize_int8

_PREQUANTIZED = ("gptq", "awq")


def quantize_checkpoint(checkpoint: Checkpoint, quantization: str, group_size: int, model_class: type,
                        config: Mapping, dtype: torch.dtype) -> tuple[Checkpoint, str]:
    """(the checkpoint to store, the scheme applied). "" takes the checkpoint's own (GPTQ/AWQ) or none.

    The returned checkpoint yields floating tensors already in `dtype`. Raises
    InvalidArgumentError for an unknown scheme or one that contradicts the checkpoint.
    """
    own = (checkpoint.config.get("quantization_config") or {}).get("quant_method", "")
    quantization = (quantization or own or "none").lower()
    if quantization not in QUANTIZATIONS:
        raise InvalidArgumentError(f"unknown quantization {quantization!r}; use one of: {', '.join(QUANTIZATIONS)}")
    if own and quantization != own:
        raise InvalidArgumentError(
            f"{checkpoint.source} is already quantized with {own!r}; leave quantization empty or pass {own!r}"
        )
    if quantization in _PREQUANTIZED:
        return PackedInt4Checkpoint(checkpoint, dtype), quantization
    if quantization == "none":
        return checkpoint, "none"
    if quantization == "gguf" and checkpoint.load_format != "gguf":
        raise InvalidArgumentError(f"quantization 'gguf' keeps a GGUF file's 4-bit blocks; {checkpoint.source} is not GGUF")
    names = linear_weight_sources(model_class, config, checkpoint.tensor_specs())
    if quantization == "gguf":
        return GGUFBlocksCheckpoint(checkpoint, names, dtype), "gguf"
    if group_size < 0:
        raise InvalidArgumentError(f"quantization_group_size must be > 0, got {group_size}")
    return RoundToNearestCheckpoint(checkpoint, quantization, names, dtype, group_size or DEFAULT_GROUP_SIZE), quantization


def linear_weight_sources(model_class: type, config: Mapping, specs: list[TensorSpec]) -> set[str]:
    """Checkpoint tensors that fill the weight of an nn.Linear of the model (lm_head excepted:
    the logits read its weight directly, and it is usually kept in full precision)."""
    with torch.device("meta"):
        model = model_class(config)
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"}
    return {
        source.name
        for target in plan_weights(model_class, config, specs)
        if target.name.endswith(".weight") and target.name.removesuffix(".weight") in linears
        for source in target.sources
    }


class _Wrapped(Checkpoint):
    """Delegates everything but the tensors to the wrapped checkpoint."""

    def __init__(self, inner: Checkpoint, dtype: torch.dtype):
        super().__init__(inner.source)
        self.inner, self.dtype = inner, dtype
        self.config = inner.config
        self.load_format = inner.load_format

    def _config_name(self) -> str:
        return self.inner._config_name()

    def tokenizer_files(self) -> dict[str, bytes]:
        return self.inner.tokenizer_files()

    def _cast(self, spec: TensorSpec) -> TensorSpec:
        return TensorSpec(spec.name, spec.shape, self._cast_dtype(spec.dtype), spec.source_dtype, spec.file)

    def _cast_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if dtype.is_floating_point else dtype


def _component_specs(prefix: str, spec: TensorSpec, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
    return [TensorSpec(f"{prefix}.{part}", shape, dtype, spec.source_dtype, spec.file)
            for part, (shape, dtype) in shapes.items()]


class RoundToNearestCheckpoint(_Wrapped):
    """int8 (per channel), int4 (per group) or fp8 (per channel) from the checkpoint's float weights."""

    def __init__(self, inner: Checkpoint, method: str, names: set[str], dtype: torch.dtype, group_size: int):
        super().__init__(inner, dtype)
        self.method, self.names, self.group_size = method, names, group_size

    def _shapes(self, out_features: int, in_features: int) -> dict:
        if self.method == "int4":
            groups = -(-in_features // self.group_size)
            shapes = {CODES: ((out_features, -(-in_features // 2)), torch.uint8),
                      SCALE: ((out_features, groups), torch.float16), OFFSET: ((out_features, groups), torch.float16)}
            if in_features % self.group_size:
                shapes[G_IDX] = ((1, in_features), torch.int32)
            return shapes
        codes = torch.int8 if self.method == "int8" else torch.float8_e4m3fn
        return {CODES: ((out_features, in_features), codes), SCALE: ((out_features,), torch.float32)}

    def _read_specs(self) -> list[TensorSpec]:
        specs = []
        for spec in self.inner.tensor_specs():
            if spec.name in self.names:
                specs += _component_specs(spec.name.removesuffix(".weight"), spec, self._shapes(*spec.shape))
            else:
                specs.append(self._cast(spec))
        return specs

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.inner.iter_tensors():
            if name not in self.names:
                yield name, tensor.to(self._cast_dtype(tensor.dtype))
                continue
            if self.method == "int4":
                components = quantize_int4(tensor, self.group_size)
            else:
                components = (quantize_int8 if self.method == "int8" else quantize_fp8)(tensor)
            prefix = name.removesuffix(".weight")
            for part, value in components.items():
                yield f"{prefix}.{part}", value


class GGUFBlocksCheckpoint(_Wrapped):
    """A GGUF whose Q4_0 / Q4_1 linear weights stay in their 4-bit blocks; the rest dequantized."""

    def __init__(self, inner: Checkpoint, names: set[str], dtype: torch.dtype):
        super().__init__(inner, dtype)
        self.names = names

    def _kept(self, spec: TensorSpec) -> bool:
        return spec.name in self.names and spec.source_dtype in BLOCK_LAYOUT

    def _read_specs(self) -> list[TensorSpec]:
        specs = []
        for spec in self.inner.tensor_specs():
            if not self._kept(spec):
                specs.append(self._cast(spec))
                continue
            out_features, in_features = spec.shape
            groups = in_features // 32
            specs += _component_specs(spec.name.removesuffix(".weight"), spec, {
                CODES: ((out_features, in_features // 2), torch.uint8),
                SCALE: ((out_features, groups), torch.float16),
                OFFSET: ((out_features, groups), torch.float16),
            })
        return specs

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for spec, stored in self.inner.iter_stored():
            if not self._kept(spec):
                yield spec.name, self.inner.dequantized(stored, spec).to(self.dtype)
                continue
            components = gguf_q4_components(stored.data, spec.source_dtype, spec.shape[1])
            prefix = spec.name.removesuffix(".weight")
            for part, value in components.items():  # Q and K rows back in HF order, block by block
                yield f"{prefix}.{part}", self.inner.unpermute_rows(spec.name, value)


class PackedInt4Checkpoint(_Wrapped):
    """A GPTQ or AWQ checkpoint: each linear's qweight/qzeros/scales(/g_idx) become int4 components."""

    def __init__(self, inner: Checkpoint, dtype: torch.dtype):
        super().__init__(inner, dtype)
        settings = inner.config["quantization_config"]
        self.method = settings["quant_method"]
        if int(settings.get("bits", 4)) != 4:
            raise InvalidArgumentError(f"{inner.source}: only 4-bit {self.method} is supported, not {settings['bits']}-bit")
        if self.method == "awq" and str(settings.get("version", "gemm")).lower() != "gemm":
            raise InvalidArgumentError(f"{inner.source}: AWQ version {settings['version']!r}; only 'gemm' is supported")
        self.act_order = bool(settings.get("desc_act", False))
        self.zero_offset = 0 if settings.get("checkpoint_format") == "gptq_v2" else 1
        self.parts = ("qweight", "qzeros", "scales", "g_idx") if self.method == "gptq" else ("qweight", "qzeros", "scales")
        specs = inner.tensor_specs()
        # module prefix -> {part: spec}; a module is complete once all its parts are seen.
        self.modules: dict[str, dict[str, TensorSpec]] = {}
        for spec in specs:
            prefix, _, part = spec.name.rpartition(".")
            if part in self.parts:
                self.modules.setdefault(prefix, {})[part] = spec
        required = (*self.parts[:3], "g_idx") if self.act_order else self.parts[:3]
        for prefix, parts in self.modules.items():
            missing = [part for part in required if part not in parts]
            if missing:
                raise CheckpointError(f"{inner.source}: {self.method} layer {prefix} lacks {', '.join(missing)}")

    def _component_shapes(self, parts: dict[str, TensorSpec]) -> dict:
        shapes_of = gptq_shapes if self.method == "gptq" else awq_shapes
        in_features, out_features, groups = shapes_of(parts["qweight"].shape, parts["scales"].shape)
        shapes = {CODES: ((out_features, in_features // 2), torch.uint8),
                  SCALE: ((out_features, groups), parts["scales"].dtype),
                  OFFSET: ((out_features, groups), torch.float32)}
        if self.act_order:
            shapes[G_IDX] = ((1, in_features), torch.int32)
        return shapes

    def _read_specs(self) -> list[TensorSpec]:
        specs, seen = [], {}
        for spec in self.inner.tensor_specs():
            prefix, _, part = spec.name.rpartition(".")
            if prefix not in self.modules or part not in self.parts:
                specs.append(self._cast(spec))
                continue
            seen[prefix] = seen.get(prefix, 0) + 1
            if seen[prefix] == len(self.modules[prefix]):  # components appear where the last part did
                specs += _component_specs(prefix, spec, self._component_shapes(self.modules[prefix]))
        return specs

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self.inner.iter_tensors():
            prefix, _, part = name.rpartition(".")
            if prefix not in self.modules or part not in self.parts:
                yield name, tensor.to(self._cast_dtype(tensor.dtype))
                continue
            parts = pending.setdefault(prefix, {})
            parts[part] = tensor
            if len(parts) < len(self.modules[prefix]):
                continue
            del pending[prefix]
            if self.method == "gptq":
                g_idx = parts.get("g_idx")
                components = gptq_components(parts["qweight"], parts["qzeros"], parts["scales"], g_idx, self.zero_offset)
                if self.act_order and G_IDX not in components:  # desc_act, but this layer's order is the identity
                    components[G_IDX] = g_idx.to(torch.int32)[None, :]
                elif not self.act_order and G_IDX in components:
                    raise CheckpointError(f"{self.source}: {prefix}.g_idx is not in group order but desc_act is false")
            else:
                components = awq_components(parts["qweight"], parts["qzeros"], parts["scales"])
            for component, value in components.items():
                yield f"{prefix}.{component}", value
