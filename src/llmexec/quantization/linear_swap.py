"""The runner's side: swap each nn.Linear whose weight the loader quantized for the matching module.

Called between building the model (on "meta") and its strict load_weights: the
quantized components become buffers of the new modules (the shared-memory
tensors themselves, not copies) and are taken out of what load_weights sees,
so the model's own checks still cover every remaining parameter.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from llmexec.errors import CheckpointError
from llmexec.quantization import CODES, COMPONENTS
from llmexec.quantization.fp8 import Fp8Linear
from llmexec.quantization.int4 import Int4Linear
from llmexec.quantization.int8 import Int8Linear

# The codes' dtype says the scheme.
LINEAR_FOR_CODES = {torch.int8: Int8Linear, torch.uint8: Int4Linear, torch.float8_e4m3fn: Fp8Linear}


def swap_quantized_linears(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace the nn.Linear at every `<module>.weight_q` in `weights`; return the other weights.

    The new module keeps the Linear's bias parameter (still on meta), so
    load_weights fills it like any other. Raises CheckpointError when a
    quantized name is not an nn.Linear of the model or its codes' dtype is unknown.
    """
    suffix = f".{CODES}"
    prefixes = [name[: -len(suffix)] for name in weights if name.endswith(suffix)]
    if not prefixes:
        return dict(weights)
    taken = set()
    for prefix in prefixes:
        try:
            linear = model.get_submodule(prefix)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{prefix} holds quantized weights but is not a linear layer of {type(model).__name__}")
        components = {c: weights[f"{prefix}.{c}"] for c in COMPONENTS if f"{prefix}.{c}" in weights}
        module_class = LINEAR_FOR_CODES.get(components[CODES].dtype)
        if module_class is None:
            raise CheckpointError(f"{prefix}.{CODES} has dtype {components[CODES].dtype}, which no quantized layer reads")
        parent_name, _, child = prefix.rpartition(".")
        quantized = module_class(linear.in_features, linear.out_features, components, linear.bias)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
        taken |= {f"{prefix}.{c}" for c in components}
    return {name: tensor for name, tensor in weights.items() if name not in taken}
