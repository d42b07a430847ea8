"""int8 weight-only, one scale per output channel (symmetric): w[o, i] = code[o, i] * scale[o]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmexec.quantization import CODES, SCALE


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """weight [out, in] -> {codes int8 [out, in] in [-127, 127], scale float32 [out]}."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return {CODES: codes, SCALE: scale}


class Int8Linear(nn.Module):
    """x @ codes.T * scale: the scale is applied to the output, so the weight is only ever cast."""

    def __init__(self, in_features: int, out_features: int, components: dict[str, torch.Tensor],
                 bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", components[CODES], persistent=False)
        self.register_buffer("scale", components[SCALE], persistent=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.codes.to(x.dtype)) * self.scale.to(x.dtype)
        return out if self.bias is None else out + self.bias
