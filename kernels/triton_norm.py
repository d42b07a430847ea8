"""Triton RMSNorm, alone or fused with the residual add that precedes it in every decoder layer.

References: reference_ops.rms_norm and reference_ops.fused_add_rms_norm (layers.RMSNorm's numerics:
the sum rounded to the activation dtype, the variance in float32, the normalized row rounded
to the activation dtype before the weight multiplies it). One program per row; the row is
read once, so the fused version moves 2 reads + 2 writes per element instead of 3 + 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmexec.kernels.triton_support import next_power_of_2

MAX_HIDDEN = 65536  # one row per program, held in registers


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_residual,
    stride_out,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_residual + cols, x, mask=mask)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, 0) / hidden
    normed = (h * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, out):
    hidden = x.shape[-1]
    assert x.dim() == 2 and x.stride(-1) == 1, "x must be [rows, hidden] with contiguous rows"
    assert weight.shape == (hidden,) and weight.is_contiguous() and weight.device == x.device
    assert hidden <= MAX_HIDDEN, hidden
    out_dtype = torch.promote_types(x.dtype, weight.dtype)  # as `weight * normed` promotes in torch
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    assert out.shape == x.shape and out.dtype == out_dtype and out.stride(-1) == 1
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1
    if x.shape[0] == 0:
        return out
    block = next_power_of_2(hidden)
    _rms_norm_kernel[(x.shape[0],)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, hidden], weight [hidden] -> [rows, hidden] in promote(x, weight) dtype."""
    return _launch(x, None, weight, eps, out)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual (in place, in x's dtype); returns (rms_norm(residual) * weight, residual).

    x, residual: [rows, hidden], same dtype. out may be x itself (each program reads its row first).
    """
    return _launch(x, residual, weight, eps, out), residual
