"""int4 weight-only, group-wise: two 4-bit codes per byte, a scale and an offset per group of input columns.

w[o, i] = code[o, i] * scale[o, g(i)] + offset[o, g(i)], g(i) = i // group_size, or
g_idx[i] when given (GPTQ act-order, or a group size that does not divide `in`).
The same form holds our own round-to-nearest quantization, GGUF's Q4_0 / Q4_1
blocks (group 32, scale d, offset -8d or m) and GPTQ / AWQ (offset -zero * scale),
each without a second rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmexec.quantization import CODES, G_IDX, OFFSET, SCALE

DEFAULT_GROUP_SIZE = 128


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 16) [rows, cols] -> uint8 [rows, ceil(cols / 2)], column 2j in the low nibble."""
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 [rows, cols]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :cols]


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """weight [out, in] -> components: round to nearest between each group's min and max.

    Scales and offsets are float16 and the codes are computed against the
    rounded values, so dequantization reproduces exactly what was chosen. A
    last, shorter group (group_size not dividing `in`) is described by g_idx.
    """
    out_features, in_features = weight.shape
    groups = -(-in_features // group_size)
    weight = weight.float()
    pad = groups * group_size - in_features
    if pad:  # repeat the last column: a short last group's range stays its own
        weight = torch.cat((weight, weight[:, -1:].expand(-1, pad)), dim=1)
    grouped = weight.view(out_features, groups, group_size)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scale = ((high - low) / 15).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    offset = low.to(torch.float16)
    codes = (grouped - offset.float()[..., None]).div_(scale.float()[..., None]).round_().clamp_(0, 15)
    codes = codes.view(out_features, -1)[:, :in_features].to(torch.uint8)
    components = {CODES: pack_nibbles(codes), SCALE: scale, OFFSET: offset}
    if in_features % group_size:
        components[G_IDX] = (torch.arange(in_features, dtype=torch.int32) // group_size)[None, :]
    return components


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, in_features: int,
                    g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight [out, in] the components describe."""
    values = unpack_nibbles(codes, in_features).float()
    if g_idx is None:
        group_size = in_features // scale.shape[1]
        scale = scale.float().repeat_interleave(group_size, dim=1)
        offset = offset.float().repeat_interleave(group_size, dim=1)
    else:
        index = g_idx[0].long()
        scale, offset = scale.float()[:, index], offset.float()[:, index]
    return values * scale + offset


class Int4Linear(nn.Module):
    """A linear layer over int4 components; the full-precision weight exists only inside forward."""

    def __init__(self, in_features: int, out_features: int, components: dict[str, torch.Tensor],
                 bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", components[CODES], persistent=False)
        self.register_buffer("scale", components[SCALE], persistent=False)
        self.register_buffer("offset", components[OFFSET], persistent=False)
        g_idx = components.get(G_IDX)
        if g_idx is not None and g_idx.device.type != "meta" and not bool((g_idx == g_idx[:1]).all()):
            raise ValueError("fused parts of an int4 layer have different g_idx; they cannot share one matmul")
        self.register_buffer("g_idx", g_idx, persistent=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_int4(self.codes, self.scale, self.offset, self.in_features, self.g_idx)
        return F.linear(x, weight.to(x.dtype), self.bias)
