"""Triton paged decode attention: one query token per sequence, split along the context.

Reference: reference_ops.paged_attention_varlen with query_len 1 per sequence.

Decode reads every cached K/V byte once and does ~4 flops per byte, so it is bound by
memory bandwidth, and the only way to reach it is to keep enough loads in flight on every
multiprocessor. Hence:
  - one program per (sequence, kv head, context split): the kv head's group of query heads
    rides along as the rows of one tile, so each K/V tile is loaded once for the whole group;
  - flash-decoding: a sequence's context is cut into `num_splits` partitions so that a few
    long sequences still give every multiprocessor several programs; each writes an
    unnormalized partial output with its running max and sum, and a second small kernel
    merges them. With one split the first kernel writes the final output directly;
  - tiles of BLOCK_N keys spanning several cache blocks, 16-bit loads, float32 accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmexec.kernels.triton_paged_tile import attend_paged_tile
from llmexec.kernels.triton_support import (
    cdiv,
    check_kv_cache,
    dot_precision,
    multiprocessor_count,
    next_power_of_2,
)

LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64  # keys per tile
    num_warps: int = 4
    # Triton spends two pipeline stages on the block-table load the K/V addresses depend on:
    # at 3 stages (triton 3.9, sm_90) K/V get one shared buffer and each tile's load waits
    # out its full latency; at 5 they get two, and the next tile loads during this one's math.
    num_stages: int = 5
    # Split the context until the grid has about this many programs per SM: many short programs
    # keep the last wave's idle tail small; each split costs one partial [group, head_dim] write.
    programs_per_sm: int = 8
    min_partition: int = 256  # ...but never below this many keys per split
    num_splits: int | None = None  # force a split count (tests, benchmarks); None = from the rules above


def default_decode_config(device: torch.device, head_dim: int) -> DecodeConfig:
    if device.type != "cuda":
        return DecodeConfig(block_n=32, min_partition=64)
    return DecodeConfig(block_n=64 if head_dim <= 128 else 32)


def choose_num_splits(
    config: DecodeConfig, num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device
) -> tuple[int, int]:
    """(num_splits, partition_size): partition_size is a multiple of block_n and covers max_seq_len."""
    max_tiles = max(1, cdiv(max_seq_len, config.block_n))
    if config.num_splits is not None:
        num_splits = config.num_splits
    else:
        target_programs = config.programs_per_sm * multiprocessor_count(device)
        num_splits = cdiv(target_programs, num_seqs * num_kv_heads)
        num_splits = min(num_splits, max(1, max_seq_len // config.min_partition))
    num_splits = max(1, min(num_splits, max_tiles))
    partition_size = cdiv(max_tiles, num_splits) * config.block_n
    return cdiv(max_tiles * config.block_n, partition_size), partition_size


@triton.jit
def _decode_partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    alibi_slopes_ptr,
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    scale_log2,
    sliding_window,
    partition_size,
    num_splits,
    stride_q_seq,
    stride_q_head,
    stride_out_seq,
    stride_out_head,
    stride_k_block,
    stride_k_token,
    stride_k_head,
    stride_v_block,
    stride_v_token,
    stride_v_head,
    stride_block_table,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # kv heads vary fastest across the grid: a token's heads are adjacent in the cache row,
    # so the programs reading one tile's heads run together and share DRAM pages.
    kv_head = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    start = split * partition_size
    if start >= seq_len:  # past this sequence's end: the merge reads only splits that hold keys
        return
    end = tl.minimum(start + partition_size, seq_len)
    lo = start
    if USE_WINDOW:  # the query at seq_len - 1 sees keys >= seq_len - W; skip whole tiles before that
        first_key = tl.maximum(seq_len - sliding_window, 0)
        lo = tl.maximum(start, start + (first_key - start) // BLOCK_N * BLOCK_N)
        lo = tl.minimum(lo, end)  # a split wholly before the window writes an empty partial

    rows = tl.arange(0, BLOCK_M)
    heads = kv_head * GROUP + rows
    row_valid = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    query_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + (seq_len - 1)
    slopes = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        slopes = tl.load(alibi_slopes_ptr + heads, mask=row_valid, other=0.0) * 1.4426950408889634

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_head_ptr = k_cache_ptr + kv_head * stride_k_head
    v_head_ptr = v_cache_ptr + kv_head * stride_v_head
    table_row = block_tables_ptr + seq * stride_block_table
    # Whole tiles first, without bounds checks; then the last partial tile, masked.
    full_end = lo + (end - lo) // BLOCK_N * BLOCK_N
    for tile_start in range(lo, full_end, BLOCK_N):
        acc, m_i, l_i = attend_paged_tile(
            q, acc, m_i, l_i, k_head_ptr, v_head_ptr, table_row,
            stride_k_block, stride_k_token, stride_v_block, stride_v_token,
            tile_start, end, query_pos, slopes, sliding_window, scale_log2,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D,
            False, False, USE_ALIBI, USE_WINDOW, DOT_PRECISION,
        )  # fmt: skip
    if full_end < end:
        acc, m_i, l_i = attend_paged_tile(
            q, acc, m_i, l_i, k_head_ptr, v_head_ptr, table_row,
            stride_k_block, stride_k_token, stride_v_block, stride_v_token,
            full_end, end, query_pos, slopes, sliding_window, scale_log2,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D,
            True, False, USE_ALIBI, USE_WINDOW, DOT_PRECISION,
        )  # fmt: skip

    store_mask = row_valid[:, None] & dim_valid[None, :]
    if SINGLE_SPLIT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i is 0 only in padded rows
        out_ptrs = out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # partials: [num_seqs, num_heads, num_splits(, HEAD_DIM)], contiguous
        part_row = (seq * NUM_HEADS + heads) * num_splits + split
        tl.store(part_acc_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], acc, mask=store_mask)
        tl.store(part_max_ptr + part_row, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part_row, l_i, mask=row_valid)


@triton.jit
def _decode_merge_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    seq_lens_ptr,
    partition_size,
    num_splits,
    stride_out_seq,
    stride_out_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,  # splits merged per step
):
    head = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    used_splits = tl.cdiv(seq_len, partition_size)  # the later splits wrote nothing
    part_base = (seq * NUM_HEADS + head) * num_splits
    offs = tl.arange(0, BLOCK_SPLITS)
    dims = tl.arange(0, BLOCK_D)

    # Pass 1: the global max over splits; a split that saw no allowed key holds -inf.
    global_max = tl.full([BLOCK_SPLITS], float("-inf"), dtype=tl.float32)
    for first in range(0, used_splits, BLOCK_SPLITS):
        split_max = tl.load(
            part_max_ptr + part_base + first + offs, mask=first + offs < used_splits, other=float("-inf")
        )
        global_max = tl.maximum(global_max, split_max)
    top = tl.max(global_max, 0)

    # Pass 2: rescale every split's sum and output to that max and add them up.
    total = tl.zeros([BLOCK_SPLITS], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, used_splits, BLOCK_SPLITS):
        split_ok = first + offs < used_splits
        split_max = tl.load(part_max_ptr + part_base + first + offs, mask=split_ok, other=float("-inf"))
        split_sum = tl.load(part_sum_ptr + part_base + first + offs, mask=split_ok, other=0.0)
        weight = tl.exp2(split_max - top)
        total += split_sum * weight
        split_acc = tl.load(
            part_acc_ptr + (part_base + first + offs)[:, None] * HEAD_DIM + dims[None, :],
            mask=split_ok[:, None] & (dims[None, :] < HEAD_DIM),
            other=0.0,
        )
        acc += tl.sum(split_acc * weight[:, None], 0)
    out = acc / tl.sum(total, 0)
    tl.store(
        out_ptr + seq * stride_out_seq + head * stride_out_head + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    *,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged K/V.

    query: [B, heads, head_dim] (the token at position seq_len - 1 of each sequence).
    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim], same dtype as query,
        already holding this token's key/value.
    block_tables: [B, max_blocks] int32/int64, covering each sequence's seq_len.
    seq_lens: [B] int32/int64, each >= 1. max_seq_len: their max, a host int (no device sync here).
    alibi_slopes: [heads] float32 or None; sliding_window: W or None (keys in (p - W, p]).
    out: [B, heads, head_dim] in query's dtype, or None to allocate. Returns out.
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    check_kv_cache(k_cache, v_cache, num_kv_heads, head_dim)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert query.dtype == k_cache.dtype, f"query {query.dtype} and cache {k_cache.dtype} must match"
    assert query.stride(-1) == 1, "query rows must be contiguous along head_dim"
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs
    assert block_tables.dtype in (torch.int32, torch.int64) and block_tables.stride(-1) == 1
    assert seq_lens.shape == (num_seqs,) and seq_lens.dtype in (torch.int32, torch.int64)
    assert block_tables.shape[1] * k_cache.shape[1] >= max_seq_len, "block tables do not cover max_seq_len"
    assert query.device == k_cache.device == block_tables.device == seq_lens.device
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1
    if alibi_slopes is not None:
        assert alibi_slopes.shape == (num_heads,) and alibi_slopes.dtype == torch.float32
        assert alibi_slopes.device == query.device and alibi_slopes.is_contiguous()
    assert sliding_window is None or sliding_window >= 1
    if num_seqs == 0:
        return out

    config = config or default_decode_config(query.device, head_dim)
    group = num_heads // num_kv_heads
    num_splits, partition_size = choose_num_splits(config, num_seqs, num_kv_heads, max_seq_len, query.device)
    block_d = next_power_of_2(head_dim)
    single = num_splits == 1
    if single:  # the partial buffers are never touched
        part_acc = part_max = part_sum = out
    else:
        part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        part_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
    _decode_partition_kernel[(num_kv_heads, num_seqs, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens,
        alibi_slopes if alibi_slopes is not None else query,
        out, part_acc, part_max, part_sum,
        scale * LOG2E, sliding_window or 0, partition_size, num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_M=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=k_cache.shape[1], BLOCK_N=config.block_n,
        USE_ALIBI=alibi_slopes is not None, USE_WINDOW=sliding_window is not None,
        SINGLE_SPLIT=single, DOT_PRECISION=dot_precision(query.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if not single:
        _decode_merge_kernel[(num_heads, num_seqs)](
            out, part_acc, part_max, part_sum, seq_lens, partition_size, num_splits,
            out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_SPLITS=min(16, next_power_of_2(num_splits)),
            num_warps=4,
        )  # fmt: skip
    return out
