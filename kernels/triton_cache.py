"""Triton reshape_and_cache: write each token's K and V rows into its paged-cache slot.

Reference: torch_reference.reshape_and_cache. One program per token moves all of its
kv heads at once, so each program reads and writes two contiguous [kv_heads, head_dim]
rows (the cache's [block, offset] row holds every head of one token).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmexec.kernels.triton_support import check_kv_cache, next_power_of_2


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_k_slot,
    stride_k_head,
    stride_v_slot,
    stride_v_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: nothing to write
        return
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    key = tl.load(key_ptr + token * stride_key_token + heads[:, None] * stride_key_head + dims[None, :], mask=mask)
    value = tl.load(
        value_ptr + token * stride_value_token + heads[:, None] * stride_value_head + dims[None, :], mask=mask
    )
    # The cache viewed as [num_blocks * block_size, kv_heads, head_dim]: a slot is a row index.
    k_dst = k_cache_ptr + slot * stride_k_slot + heads[:, None] * stride_k_head + dims[None, :]
    v_dst = v_cache_ptr + slot * stride_v_slot + heads[:, None] * stride_v_head + dims[None, :]
    tl.store(k_dst, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [T, kv_heads, head_dim] into k_cache/v_cache [num_blocks, block_size, kv_heads, head_dim]
    at slot_mapping [T] (int32 or int64; slot = block_id * block_size + offset; negative = skip), in place."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, (value.shape, key.shape)
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int32, torch.int64)
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "key/value rows must be contiguous along head_dim"
    check_kv_cache(k_cache, v_cache, num_kv_heads, head_dim)
    # A block's offsets must be consecutive rows: slot * stride_slot addresses them.
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1), "cache blocks must be contiguous"
    assert v_cache.stride(0) == v_cache.shape[1] * v_cache.stride(1), "cache blocks must be contiguous"
    assert key.device == k_cache.device == slot_mapping.device
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_HEADS=next_power_of_2(num_kv_heads),
        BLOCK_D=next_power_of_2(head_dim),
        num_warps=4,
    )
