"""Checking, before any weight is copied, that the runner will accept what the loader is about to write.

The runner builds the model and binds the loader's tensors with the model's own
strict `load_weights` (every parameter filled once, exact shapes, one dtype).
Running that same binding here on "meta" tensors (shapes and dtypes, no data)
turns a checkpoint with a missing or misshapen tensor into an error at
LoadModel, naming the checkpoint, instead of a runner that cannot attach.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from llmexec.errors import CheckpointError
from llmexec.quantization.linear_swap import swap_quantized_linears
from llmexec.weight_layout import TensorLocation


def check_model_accepts(model_class: type, config: Mapping, tensors: Sequence[TensorLocation], source: str) -> int:
    """Bind `tensors` (name, dtype, shape as they will be in shared memory) to a model built on meta,
    swapping quantized linears first as the runner does. Returns the model's parameter count
    (before quantization; tied weights once).

    Raises CheckpointError prefixed with `source` when the model refuses them.
    """
    with torch.device("meta"):
        model = model_class(config)
    parameter_count = sum(parameter.numel() for parameter in model.parameters())
    weights = {
        location.name: torch.empty(location.shape, dtype=getattr(torch, location.dtype), device="meta")
        for location in tensors
    }
    try:
        model.load_weights(swap_quantized_linears(model, weights))
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    return parameter_count
