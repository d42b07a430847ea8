"""FP8 (e4m3) weights with one float32 scale per output channel: w[o, i] = code[o, i] * scale[o].

On a GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper) the
matmul itself runs in FP8 through torch._scaled_mm: activations are scaled per
token into e4m3 on the fly, and both scales are applied to the output. Elsewhere
(CPU, older GPUs, sizes _scaled_mm does not take) the codes are cast to the
activation dtype and the scale applied to the output, as for int8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmexec.quantization import CODES, SCALE

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_fp8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """weight [out, in] -> {codes float8_e4m3fn [out, in], scale float32 [out]}."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return {CODES: (weight / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), SCALE: scale}


def fp8_matmul_supported(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether torch._scaled_mm can take this product on this device."""
    if not x.is_cuda or torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    # cuBLASLt FP8: sizes multiples of 16; row-wise scales need a bf16 output.
    return codes.shape[0] % 16 == 0 and codes.shape[1] % 16 == 0 and x.dtype == torch.bfloat16


def scaled_fp8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] (bf16, CUDA) @ codes.T with per-token and per-channel scales -> [..., out] in x.dtype."""
    rows = x.reshape(-1, x.shape[-1])
    x_scale = (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    x_codes = (rows.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    out = torch._scaled_mm(x_codes, codes.t(), scale_a=x_scale, scale_b=scale.float()[None, :], out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], codes.shape[0])


class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, components: dict[str, torch.Tensor],
                 bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", components[CODES], persistent=False)
        self.register_buffer("scale", components[SCALE], persistent=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fp8_matmul_supported(x, self.codes):
            out = scaled_fp8_linear(x, self.codes, self.scale)
        else:
            out = F.linear(x, self.codes.to(x.dtype)) * self.scale.to(x.dtype)
        return out if self.bias is None else out + self.bias
