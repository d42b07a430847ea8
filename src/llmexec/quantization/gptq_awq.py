"""Pre-quantized GPTQ and AWQ (GEMM) 4-bit linears, from their on-disk layouts to int4 components.

GPTQ (AutoGPTQ / GPTQModel / optimum), per linear:
    qweight int32 [in / 8, out]: input row 8r + k in bits 4k..4k+3 of row r
    qzeros  int32 [groups, out / 8]: output column 8c + k in bits 4k of column c
    scales  fp16  [groups, out];  g_idx int32 [in]: each input row's group
    w[o, i] = scales[g, o] * (q[i, o] - (z[g, o] + 1)), g = g_idx[i]
  The "+ 1" is the original format's (checkpoint_format "gptq"), which stores
  zero - 1; "gptq_v2" stores the zero itself.
AWQ (AutoAWQ, version "gemm"), per linear:
    qweight int32 [in, out / 8], qzeros int32 [groups, out / 8], scales fp16 [groups, out]
    the 8 nibbles of a packed column c hold output columns 8c + [0, 2, 4, 6, 1, 3, 5, 7]
    w[o, i] = scales[g, o] * (q[i, o] - z[g, o]), g = i // group_size
Both become code * scale + offset with offset = -zero * scale kept in float32,
which reproduces the formulas above exactly in float32.
"""

from __future__ import annotations

import torch

from llmexec.quantization import CODES, G_IDX, OFFSET, SCALE
from llmexec.quantization.int4 import pack_nibbles

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k holds column AWQ_ORDER[k] of its 8
_AWQ_UNDO = [AWQ_ORDER.index(column) for column in range(8)]


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> its 8 nibbles [..., 8] (nibble k = bits 4k..4k+3), as int32 in [0, 16)."""
    return (packed[..., None] >> _SHIFTS) & 0xF


def gptq_components(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                    zero_offset: int = 1) -> dict[str, torch.Tensor]:
    in_features = qweight.shape[0] * 8
    codes = _nibbles(qweight).permute(0, 2, 1).reshape(in_features, -1)  # [in, out]
    zeros = _nibbles(qzeros).reshape(qzeros.shape[0], -1) + zero_offset  # [groups, out]
    components = _int4(codes, zeros, scales)
    groups = scales.shape[0]
    contiguous = torch.arange(in_features, dtype=torch.int32) // (in_features // groups)
    if g_idx is not None and not torch.equal(g_idx.to(torch.int32), contiguous):
        components[G_IDX] = g_idx.to(torch.int32)[None, :]  # act-order (desc_act)
    return components


def awq_components(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    codes = _nibbles(qweight)[..., _AWQ_UNDO].reshape(qweight.shape[0], -1)  # [in, out]
    zeros = _nibbles(qzeros)[..., _AWQ_UNDO].reshape(qzeros.shape[0], -1)
    return _int4(codes, zeros, scales)


def _int4(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = scales.t().contiguous()  # [out, groups], as stored (fp16)
    offset = (-zeros.t().float() * scale.float()).contiguous()
    return {CODES: pack_nibbles(codes.t().to(torch.uint8).contiguous()), SCALE: scale, OFFSET: offset}


def gptq_shapes(qweight_shape: tuple[int, ...], scales_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(in, out, groups) of a GPTQ linear from its tensors' shapes."""
    return qweight_shape[0] * 8, qweight_shape[1], scales_shape[0]


def awq_shapes(qweight_shape: tuple[int, ...], scales_shape: tuple[int, ...]) -> tuple[int, int, int]:
    return qweight_shape[0], qweight_shape[1] * 8, scales_shape[0]
