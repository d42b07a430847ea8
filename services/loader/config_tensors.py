"""The tensors a checkpoint of a given config holds, known from the config alone.

transformers builds the architecture on the "meta" device (shapes, no storage,
about a second even for 70B), and its state dict is exactly what
`save_pretrained` would write: tied weights once, GQA-sized K/V, untied heads,
biases and norms included. This is what the dummy loader fills and what the
analyzer counts when there are no weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from llmexec.errors import InvalidArgumentError, UnsupportedArchitectureError
from llmexec.loader.checkpoint import TensorSpec


def config_dtype(config: Mapping) -> torch.dtype:
    """The dtype a config says its weights are in (`dtype`, formerly `torch_dtype`); float32 if none."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgumentError(f"config dtype {name!r} is not a floating torch dtype")
    return dtype


def config_tensor_specs(config: Mapping) -> list[TensorSpec]:
    """HF name, shape and dtype of every tensor a checkpoint of `config` holds, in state-dict order.

    Raises UnsupportedArchitectureError when transformers does not know the
    architecture (the config is then all we have, and it says nothing about
    tensor names).
    """
    import transformers

    config = dict(config)
    model_type = config.pop("model_type", None)
    architectures = config.get("architectures") or []
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **config)
    except (ValueError, TypeError) as error:
        raise UnsupportedArchitectureError(
            f"transformers cannot build a config of model_type {model_type!r}: {error}"
        ) from error
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    dtype = config_dtype(config)
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "generation flags are not valid" and other chatter about a model never run
    try:
        with torch.device("meta"):
            if model_class is not None:
                model = model_class._from_config(hf_config)
            else:
                model = transformers.AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError) as error:
        raise UnsupportedArchitectureError(
            f"transformers cannot build {architectures or model_type!r} from this config: {error}"
        ) from error
    finally:
        quiet.setLevel(level)
    specs, seen = [], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied weight: saved once, under its first name
            continue
        seen.add(id(tensor))
        target = dtype if tensor.dtype.is_floating_point else tensor.dtype
        specs.append(TensorSpec(name, tuple(tensor.shape), target, "config"))
    return specs
