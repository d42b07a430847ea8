"""Triton rotary embedding (rotate-half, as Llama and GPT-NeoX), applied in place to q and k.

Reference: reference_ops.rotary_embedding (layers.apply_partial_rotary on the same angles).
Angles come from a float32 cos/sin table indexed by position (rotary_table.rotary_cos_sin_cache), so
the kernel computes no trigonometry and large positions keep full precision. The first
rotary_dim dims of each head rotate; the rest (GPT-NeoX's partial rotary) are left alone.
One program per token rotates all of its query and key heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmexec.kernels.triton_support import next_power_of_2


@triton.jit
def _rotate_heads(
    x_ptr,
    stride_head,
    cos,
    sin,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < NUM_HEADS) & (dims[None, :] < HALF)
    first = x_ptr + heads[:, None] * stride_head + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_cache_pos,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    angles = cos_sin_ptr + position * stride_cache_pos + dims
    cos = tl.load(angles, mask=dims < HALF, other=1.0)
    sin = tl.load(angles + HALF, mask=dims < HALF, other=0.0)
    _rotate_heads(q_ptr + token * stride_q_token, stride_q_head, cos, sin, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_k_token, stride_k_head, cos, sin, NUM_K_HEADS, HALF, BLOCK_KH, BLOCK_HALF)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Rotate query [T, heads, head_dim] and key [T, kv_heads, head_dim] in place.

    positions: [T] int32/int64, each < cos_sin_cache.shape[0].
    cos_sin_cache: [max_positions, rotary_dim] float32 from rotary_cos_sin_cache; rotary_dim <= head_dim, even.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    rotary_dim = cos_sin_cache.shape[1]
    assert key.shape == (num_tokens, num_kv_heads, head_dim), (key.shape, query.shape)
    assert positions.shape == (num_tokens,) and positions.dtype in (torch.int32, torch.int64)
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(1) == 1
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim, (rotary_dim, head_dim)
    assert query.stride(-1) == 1 and key.stride(-1) == 1, "heads must be contiguous along head_dim"
    assert query.dtype == key.dtype
    assert query.device == key.device == positions.device == cos_sin_cache.device
    if num_tokens == 0:
        return
    half = rotary_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions,
        query,
        key,
        cos_sin_cache,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_heads,
        NUM_K_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_QH=next_power_of_2(num_heads),
        BLOCK_KH=next_power_of_2(num_kv_heads),
        BLOCK_HALF=next_power_of_2(half),
        num_warps=4,
    )
