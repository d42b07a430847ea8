"""HF architecture name -> model class, imported only when asked for."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

from torch import nn

from llmexec.errors import UnsupportedArchitectureError

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llmexec.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llmexec.models.llama", "LlamaForCausalLM"),
}

# Configs without "architectures" (e.g. made in code by transformers) still carry model_type.
_ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def _check_mistral(config: Mapping) -> None:
    sliding_window = config.get("sliding_window")
    max_positions = config.get("max_position_embeddings")
    if sliding_window is not None and (max_positions is None or sliding_window < max_positions):
        raise UnsupportedArchitectureError(
            f"MistralForCausalLM with sliding_window={sliding_window} (< max_position_embeddings="
            f"{max_positions}) is not supported yet: sliding-window attention is not implemented"
        )


_CONFIG_CHECKS: dict[str, Callable[[Mapping], None]] = {"MistralForCausalLM": _check_mistral}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def architecture_of(config: Mapping) -> str:
    """The architecture a config names: architectures[0], else derived from model_type."""
    architectures = config.get("architectures")
    if architectures:
        return architectures[0]
    model_type = config.get("model_type")
    if model_type in _ARCHITECTURE_OF_MODEL_TYPE:
        return _ARCHITECTURE_OF_MODEL_TYPE[model_type]
    raise UnsupportedArchitectureError(
        f"config names no architecture (model_type={model_type!r}); supported: {', '.join(supported_architectures())}"
    )


def model_class_for(architecture: str, config: Mapping | None = None) -> type[nn.Module]:
    """The nn.Module class for an HF architecture name; with `config`, also checks the
    architecture-specific limits (e.g. Mistral's sliding window)."""
    if architecture not in _MODELS:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
        )
    if config is not None and architecture in _CONFIG_CHECKS:
        _CONFIG_CHECKS[architecture](config)
    module_path, class_name = _MODELS[architecture]
    return getattr(importlib.import_module(module_path), class_name)
