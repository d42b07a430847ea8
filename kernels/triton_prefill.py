"""Triton paged prefill attention over a flattened variable-length batch.

Reference: reference_ops.paged_attention_varlen.

Sequence i owns query rows [query_start_loc[i], query_start_loc[i+1]); those tokens are the
last query_len of its seq_len positions, so the first seq_len - query_len keys come from
earlier steps (chunked prefill, a reused prefix) and are read from the paged cache like the
new ones (reshape_and_cache has written this step's keys first). Causal, with optional
sliding window and ALiBi. One program per (tile of query tokens, kv head, sequence); a
tile's rows are (token, head) pairs of the kv head's group, so every K/V tile is loaded once
for all the group's heads. Key tiles wholly before the tile's first query need no causal
mask and take a cheaper path. Sequences with query_len 1 are handled too (as 1-token tiles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmexec.kernels.triton_paged_tile import attend_paged_tile
from llmexec.kernels.triton_support import cdiv, check_kv_cache, dot_precision, next_power_of_2

LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 128  # rows per tile: (query token, head of the group) pairs
    block_n: int = 64  # keys per tile
    num_warps: int = 8
    num_stages: int = 5  # 3 K/V buffers; fewer stages leave the indirect loads unoverlapped (see DecodeConfig)


def default_prefill_config(device: torch.device, head_dim: int, group: int) -> PrefillConfig:
    if device.type != "cuda":
        return PrefillConfig(block_m=max(16, next_power_of_2(group)), block_n=16)
    if head_dim > 128:
        return PrefillConfig(block_m=max(64, next_power_of_2(group)), block_n=32, num_warps=4, num_stages=2)
    return PrefillConfig(block_m=max(128, next_power_of_2(group)))


# Ints that change from step to step are not specialized on (divisible by 16, equal to 1):
# each new combination would compile the kernel again in the middle of serving.
@triton.jit(do_not_specialize=["sliding_window", "num_query_tiles", "stride_block_table"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    alibi_slopes_ptr,
    out_ptr,
    scale_log2,
    sliding_window,
    num_query_tiles,
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_k_block,
    stride_k_token,
    stride_k_head,
    stride_v_block,
    stride_v_token,
    stride_v_head,
    stride_block_table,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SKIP_SINGLE_TOKEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    TOKENS = BLOCK_M // GROUP  # query tokens per tile
    # Last tiles first: along the causal diagonal they have the most keys.
    tile = num_query_tiles - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    query_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    query_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - query_start
    first_token = tile * TOKENS
    tokens_here = query_len
    if SKIP_SINGLE_TOKEN:  # the decode kernel does the query_len == 1 sequences
        tokens_here = tl.where(query_len == 1, 0, query_len)
    if first_token >= tokens_here:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    tokens = first_token + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_valid = (rows < TOKENS * GROUP) & (tokens < query_len)
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    token_rows = (query_start + tokens).to(tl.int64)
    q = tl.load(
        q_ptr + token_rows[:, None] * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    query_pos = context_len + tokens
    slopes = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        slopes = tl.load(alibi_slopes_ptr + heads, mask=row_valid, other=0.0) * 1.4426950408889634

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_head_ptr = k_cache_ptr + kv_head * stride_k_head
    v_head_ptr = v_cache_ptr + kv_head * stride_v_head
    table_row = block_tables_ptr + seq * stride_block_table

    first_pos = context_len + first_token
    key_end = tl.minimum(first_pos + TOKENS, seq_len)  # one past the tile's last query position
    if USE_WINDOW:
        # Every key tile may cut some row's window: one masked loop from the first row's window start.
        lo = tl.maximum(first_pos - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
        for tile_start in range(lo, key_end, BLOCK_N):
            acc, m_i, l_i = attend_paged_tile(
                q, acc, m_i, l_i, k_head_ptr, v_head_ptr, table_row,
                stride_k_block, stride_k_token, stride_v_block, stride_v_token,
                tile_start, key_end, query_pos, slopes, sliding_window, scale_log2,
                BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D,
                True, True, USE_ALIBI, True, DOT_PRECISION,
            )  # fmt: skip
    else:
        # Keys before first_pos are visible to every row of the tile: no mask needed there.
        unmasked_end = first_pos // BLOCK_N * BLOCK_N
        for tile_start in range(0, unmasked_end, BLOCK_N):
            acc, m_i, l_i = attend_paged_tile(
                q, acc, m_i, l_i, k_head_ptr, v_head_ptr, table_row,
                stride_k_block, stride_k_token, stride_v_block, stride_v_token,
                tile_start, key_end, query_pos, slopes, sliding_window, scale_log2,
                BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D,
                False, False, USE_ALIBI, False, DOT_PRECISION,
            )  # fmt: skip
        for tile_start in range(unmasked_end, key_end, BLOCK_N):
            acc, m_i, l_i = attend_paged_tile(
                q, acc, m_i, l_i, k_head_ptr, v_head_ptr, table_row,
                stride_k_block, stride_k_token, stride_v_block, stride_v_token,
                tile_start, key_end, query_pos, slopes, sliding_window, scale_log2,
                BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D,
                True, True, USE_ALIBI, False, DOT_PRECISION,
            )  # fmt: skip

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i is 0 only in padded rows
    out_ptrs = out_ptr + token_rows[:, None] * stride_out_token + heads[:, None] * stride_out_head + dims[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
    skip_single_token: bool = False,
    out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal attention of a flattened varlen batch of query tokens over their paged K/V.

    query: [T, heads, head_dim]; sequence i owns rows query_start_loc[i]:query_start_loc[i+1]
        (query_start_loc [B+1] int32/int64), at positions seq_len - query_len ... seq_len - 1.
    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim], same dtype as query,
        holding all seq_len keys of every sequence (reshape_and_cache first).
    seq_lens: [B] int32/int64; block_tables: [B, max_blocks] int32/int64.
    max_query_len: the largest query_len, a host int (sizes the grid; no device sync here).
    alibi_slopes: [heads] float32 or None; sliding_window: W or None (keys in (p - W, p]).
    skip_single_token: leave the rows of query_len 1 sequences unwritten (the caller runs the
        decode kernel on them).
    out: [T, heads, head_dim] in query's dtype, or None to allocate. Returns out.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    check_kv_cache(k_cache, v_cache, num_kv_heads, head_dim)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert query.dtype == k_cache.dtype, f"query {query.dtype} and cache {k_cache.dtype} must match"
    assert query.stride(-1) == 1, "query rows must be contiguous along head_dim"
    assert query_start_loc.shape == (num_seqs + 1,) and query_start_loc.dtype in (torch.int32, torch.int64)
    assert seq_lens.dtype in (torch.int32, torch.int64)
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs
    assert block_tables.dtype in (torch.int32, torch.int64) and block_tables.stride(-1) == 1
    assert query.device == k_cache.device == block_tables.device == seq_lens.device == query_start_loc.device
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1
    if alibi_slopes is not None:
        assert alibi_slopes.shape == (num_heads,) and alibi_slopes.dtype == torch.float32
        assert alibi_slopes.device == query.device and alibi_slopes.is_contiguous()
    assert sliding_window is None or sliding_window >= 1
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    config = config or default_prefill_config(query.device, head_dim, group)
    assert config.block_m >= group and config.block_m & (config.block_m - 1) == 0, (config.block_m, group)
    num_query_tiles = cdiv(max_query_len, config.block_m // group)
    _prefill_kernel[(num_query_tiles, num_kv_heads, num_seqs)](
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        alibi_slopes if alibi_slopes is not None else query,
        out, scale * LOG2E, sliding_window or 0, num_query_tiles,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, BLOCK_M=config.block_m, HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=config.block_n,
        USE_ALIBI=alibi_slopes is not None, USE_WINDOW=sliding_window is not None,
        SKIP_SINGLE_TOKEN=skip_single_token, DOT_PRECISION=dot_precision(query.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
