"""HF architecture name -> model class, imported only when asked for."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from torch import nn

from llmexec.errors import UnsupportedArchitectureError

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llmexec.models.llama", "LlamaForCausalLM"),
    # Mistral is Llama with a sliding window, which the shared attention reads from the config.
    "MistralForCausalLM": ("llmexec.models.llama", "LlamaForCausalLM"),
    "MixtralForCausalLM": ("llmexec.models.mixtral", "MixtralForCausalLM"),
    "Qwen2ForCausalLM": ("llmexec.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llmexec.models.qwen3", "Qwen3ForCausalLM"),
    "Phi3ForCausalLM": ("llmexec.models.phi3", "Phi3ForCausalLM"),
    "GPT2LMHeadModel": ("llmexec.models.gpt2", "GPT2LMHeadModel"),
    "GPTNeoXForCausalLM": ("llmexec.models.gpt_neox", "GPTNeoXForCausalLM"),
    "OPTForCausalLM": ("llmexec.models.opt", "OPTForCausalLM"),
    "BloomForCausalLM": ("llmexec.models.bloom", "BloomForCausalLM"),
}

# Configs without "architectures" (e.g. made in code by transformers) still carry model_type.
_ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
_ARCHITECTURE_OF_MODEL_TYPE.update(
    mixtral="MixtralForCausalLM", qwen2="Qwen2ForCausalLM", qwen3="Qwen3ForCausalLM", phi3="Phi3ForCausalLM"
)
_ARCHITECTURE_OF_MODEL_TYPE.update(
    gpt2="GPT2LMHeadModel", gpt_neox="GPTNeoXForCausalLM", opt="OPTForCausalLM", bloom="BloomForCausalLM"
)


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
    """The nn.Module class for an HF architecture name; with `config`, also runs the class's
    `check_config(config)` when it has one (what it cannot run, e.g. an unknown rope scaling)."""
    if architecture not in _MODELS:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
        )
    module_path, class_name = _MODELS[architecture]
    model_class = getattr(importlib.import_module(module_path), class_name)
    if config is not None and hasattr(model_class, "check_config"):
        model_class.check_config(config)
    return model_class
