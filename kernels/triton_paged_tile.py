"""The inner step both paged-attention kernels share: one tile of keys read through a block table,
folded into a running (flash-attention) softmax.

Rows of the query tile are (token, head) pairs of one kv-head group, so a group's query
heads share every K/V tile load. Scores live in the log2 domain: the caller folds
log2(e) into the scale (and into ALiBi slopes) so the softmax uses exp2.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_paged_tile(
    q,  # [BLOCK_M, BLOCK_D], zero in padded rows and dims
    acc,  # [BLOCK_M, BLOCK_D] float32, unnormalized output so far
    m_i,  # [BLOCK_M] float32, running max of scores (log2 domain), -inf before any key
    l_i,  # [BLOCK_M] float32, running sum of exp2(score - m_i)
    k_head_ptr,  # k_cache + kv_head * stride_k_head
    v_head_ptr,
    block_table_row_ptr,  # this sequence's block table row
    stride_k_block,
    stride_k_token,
    stride_v_block,
    stride_v_token,
    tile_start,  # first key position of the tile
    key_end,  # keys at positions >= key_end do not exist (only checked when CHECK_END)
    query_pos,  # [BLOCK_M] int, each row's query position
    alibi_slopes,  # [BLOCK_M] float32, slope * log2(e) (only read when USE_ALIBI)
    sliding_window,  # W: a query at p sees keys in (p - W, p] (only read when USE_WINDOW)
    scale_log2,  # softmax scale * log2(e)
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # the cache's tokens per block
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHECK_END: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    key_pos = tile_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    # Each key finds its block through the table; tiles may span several blocks.
    if CHECK_END:
        key_exists = key_pos < key_end
        block_ids = tl.load(block_table_row_ptr + key_pos // BLOCK_SIZE, mask=key_exists, other=0).to(tl.int64)
    else:
        block_ids = tl.load(block_table_row_ptr + key_pos // BLOCK_SIZE).to(tl.int64)
    offsets = (key_pos % BLOCK_SIZE).to(tl.int64)
    k_rows = k_head_ptr + block_ids * stride_k_block + offsets * stride_k_token
    v_rows = v_head_ptr + block_ids * stride_v_block + offsets * stride_v_token
    if HEAD_DIM == BLOCK_D:
        if CHECK_END:
            load_mask = key_exists[:, None]
            k = tl.load(k_rows[:, None] + dims[None, :], mask=load_mask, other=0.0)
            v = tl.load(v_rows[:, None] + dims[None, :], mask=load_mask, other=0.0)
        else:
            k = tl.load(k_rows[:, None] + dims[None, :])
            v = tl.load(v_rows[:, None] + dims[None, :])
    else:
        if CHECK_END:
            load_mask = key_exists[:, None] & (dims[None, :] < HEAD_DIM)
        else:
            load_mask = (key_pos[:, None] >= 0) & (dims[None, :] < HEAD_DIM)
        k = tl.load(k_rows[:, None] + dims[None, :], mask=load_mask, other=0.0)
        v = tl.load(v_rows[:, None] + dims[None, :], mask=load_mask, other=0.0)

    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    if USE_ALIBI:
        distance = (key_pos[None, :] - query_pos[:, None]).to(tl.float32)
        scores += alibi_slopes[:, None] * distance
    if CHECK_END or CAUSAL or USE_WINDOW:
        allowed = key_pos[None, :] >= 0
        if CHECK_END:
            allowed = allowed & key_exists[None, :]
        if CAUSAL:
            allowed = allowed & (key_pos[None, :] <= query_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (key_pos[None, :] > query_pos[:, None] - sliding_window)
        scores = tl.where(allowed, scores, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # A row that has seen no allowed key yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(scores - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i
