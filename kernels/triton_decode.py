"""Triton paged decode attention: one query token per sequence, split along the context.

Reference: reference_ops.paged_attention_varlen with query_len 1 per sequence.

Decode reads every cached K/V byte once and does ~4 flops per byte, so it is bound by
memory bandwidth, and the only way to reach it is to keep enough loads in flight on every
multiprocessor. Hence:
  - one program per (sequence, kv head, context split): the kv head's group of query heads
    rides along as the rows of one tile, so each K/V tile is loaded once for the whole group;
  - flash-decoding: a sequence's context is cut into `num_splits` partitions so that a few
    long sequences still give every multiprocessor several programs, but no more than fit in
    one wave (a grid just past a whole wave idles most SMs for a program's time); each writes an
    unnormalized partial output with its running max and sum, and they are merged either by
    the last program of each (sequence, kv head) to finish (an atomic counter says which:
    one launch, no gap between the kernels) or by a second small kernel. With one split the
    first kernel writes the final output directly;
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
    # 32-key tiles, 4 warps, 5 stages: 123 registers and 37 KB of shared memory, so 4 programs
    # fit on an SM, each with two K/V tiles in flight. On the H200 sweep (decode_splits_h200.json)
    # this tile was within ~1% of the best tile at every batch 16/64/256 x 4k/8k/32k shape once
    # the split count followed the one-wave rule below.
    block_n: int = 32  # keys per tile
    num_warps: int = 4
    # Triton spends two pipeline stages on the block-table load the K/V addresses depend on:
    # at 3 stages (triton 3.9, sm_90) K/V get one shared buffer and each tile's load waits
    # out its full latency; at 5 they get two, and the next tile loads during this one's math.
    num_stages: int = 5
    # Split the context into the most partitions whose grid still fits in ONE wave of this many
    # programs per SM. A grid a little past a whole number of waves leaves most SMs idle while
    # the last programs run: on the H200 at batch 16 x 4k, 768 programs of 4-per-SM tiles
    # (1.45 waves) took 98 us, 384 programs (0.73 wave) 80 us. 3 leaves headroom under the 4
    # that fit, since the block scheduler does not fill SMs evenly.
    programs_per_sm: int = 3
    # ...but never below this many keys per split. Small: a short context at a small batch is
    # latency-bound (each 32-key tile waits on a block-table load, then on its K/V load), so it
    # gains from running its tiles side by side: on the H200 one sequence of 193 keys took
    # 8.9 us a layer in one 256-key split (decode_step_kernels_h200_before.json).
    min_partition: int = 64
    num_splits: int | None = None  # force a split count (tests, benchmarks); None = from the rules above
    # Merge the splits in the partition kernel's last program per (sequence, kv head) instead of
    # a second launch: saves the launch gap and the merge kernel's own ramp-up (~1 us, H200).
    fused_merge: bool = True


def default_decode_config(device: torch.device, head_dim: int) -> DecodeConfig:
    return DecodeConfig()


def choose_num_splits(
    config: DecodeConfig, num_seqs: int, num_kv_heads: int, max_seq_len: int, num_multiprocessors: int
) -> tuple[int, int]:
    """(num_splits, partition_size): partition_size is a multiple of block_n and covers max_seq_len.

    Pure: the grid is (num_kv_heads, num_seqs, num_splits); without a forced count, the most
    splits that keep it within programs_per_sm * num_multiprocessors programs (at least 1).
    """
    max_tiles = max(1, cdiv(max_seq_len, config.block_n))
    if config.num_splits is not None:
        num_splits = config.num_splits
    else:
        one_wave = config.programs_per_sm * num_multiprocessors
        num_splits = one_wave // (num_seqs * num_kv_heads)
        num_splits = min(num_splits, max(1, max_seq_len // config.min_partition))
    num_splits = max(1, min(num_splits, max_tiles))
    partition_size = cdiv(max_tiles, num_splits) * config.block_n
    return cdiv(max_tiles * config.block_n, partition_size), partition_size


# Ints that change from step to step are not specialized on (see triton_prefill).
@triton.jit(do_not_specialize=["sliding_window", "partition_size", "num_splits", "stride_block_table"])
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
    split_counters_ptr,  # [num_seqs * num_kv_heads] int32, zero before and after the launch (FUSED_MERGE)
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
    FUSED_MERGE: tl.constexpr,
    MERGE_BLOCK_H: tl.constexpr,
    MERGE_BLOCK_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # kv heads vary fastest across the grid: a token's heads are adjacent in the cache row,
    # so the programs reading one tile's heads run together and share DRAM pages.
    kv_head = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_M)
    heads = kv_head * GROUP + rows
    row_valid = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    # q is issued before seq_len is known, so the two loads' latencies overlap at program start.
    q = tl.load(
        q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
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
        if FUSED_MERGE:
            # Every thread's partial stores precede the release below (the barrier orders them
            # within the program, the gpu-scope release publishes them); the program that sees
            # the count reach the splits holding keys merges them and re-arms the counter.
            tl.debug_barrier()
            counter = split_counters_ptr + seq * tl.num_programs(0) + kv_head
            used_splits = tl.cdiv(seq_len, partition_size)
            finished_before = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if finished_before == used_splits - 1:
                tl.store(counter, 0)
                first_head = kv_head * GROUP
                merged = _merge_split_partials(
                    part_acc_ptr, part_max_ptr, part_sum_ptr, (seq * NUM_HEADS + first_head) * num_splits,
                    used_splits, num_splits, GROUP, HEAD_DIM, MERGE_BLOCK_H, MERGE_BLOCK_S, BLOCK_D,
                )  # fmt: skip
                _store_group_output(
                    out_ptr, merged, seq, first_head, stride_out_seq, stride_out_head, GROUP, HEAD_DIM,
                    MERGE_BLOCK_H, BLOCK_D,
                )  # fmt: skip


@triton.jit
def _merge_split_partials(
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    first_row,  # partial row of (first head, split 0); a head's splits follow, then the next head's
    used_splits,  # splits that hold keys: the later ones wrote nothing
    num_splits,
    NUM_ROWS: tl.constexpr,  # heads merged together
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,  # splits loaded per step
    BLOCK_D: tl.constexpr,
):
    """[BLOCK_H, BLOCK_D] float32: each head's splits rescaled to their common max and summed."""
    heads = tl.arange(0, BLOCK_H)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    rows = first_row + heads[:, None] * num_splits + splits[None, :]  # [BLOCK_H, BLOCK_S]
    head_ok = heads[:, None] < NUM_ROWS
    # .cg: read from L2, where other programs' partials landed, never from this SM's L1.
    # Pass 1: each head's max over splits; a split that saw no allowed key holds -inf.
    top = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for first in range(0, used_splits, BLOCK_S):
        ok = head_ok & (first + splits[None, :] < used_splits)
        split_max = tl.load(part_max_ptr + rows + first, mask=ok, other=float("-inf"), cache_modifier=".cg")
        top = tl.maximum(top, tl.max(split_max, 1))
    top = tl.where(top == float("-inf"), 0.0, top)  # padded heads: keep their weights 0, not NaN
    # Pass 2: rescale every split's sum and output to that max and add them up.
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for first in range(0, used_splits, BLOCK_S):
        ok = head_ok & (first + splits[None, :] < used_splits)
        split_max = tl.load(part_max_ptr + rows + first, mask=ok, other=float("-inf"), cache_modifier=".cg")
        split_sum = tl.load(part_sum_ptr + rows + first, mask=ok, other=0.0, cache_modifier=".cg")
        weight = tl.exp2(split_max - top[:, None])
        total += tl.sum(split_sum * weight, 1)
        split_acc = tl.load(
            part_acc_ptr + (rows + first)[:, :, None] * HEAD_DIM + dims[None, None, :],
            mask=ok[:, :, None] & (dims[None, None, :] < HEAD_DIM),
            other=0.0,
            cache_modifier=".cg",
        )
        acc += tl.sum(split_acc * weight[:, :, None], 1)
    return acc / tl.where(total == 0.0, 1.0, total)[:, None]  # total is 0 only in padded heads


@triton.jit
def _store_group_output(
    out_ptr, merged, seq, first_head, stride_out_seq, stride_out_head,
    NUM_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    out_ptrs = out_ptr + seq * stride_out_seq + (first_head + heads)[:, None] * stride_out_head + dims[None, :]
    mask = (heads[:, None] < NUM_ROWS) & (dims[None, :] < HEAD_DIM)
    tl.store(out_ptrs, merged.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["partition_size", "num_splits"])
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
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The unfused merge: one program per (kv head, sequence) merges its group's splits."""
    kv_head = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    first_head = kv_head * GROUP
    merged = _merge_split_partials(
        part_acc_ptr, part_max_ptr, part_sum_ptr, (seq * NUM_HEADS + first_head) * num_splits,
        tl.cdiv(seq_len, partition_size), num_splits, GROUP, HEAD_DIM, BLOCK_H, BLOCK_S, BLOCK_D,
    )  # fmt: skip
    _store_group_output(
        out_ptr, merged, seq, first_head, stride_out_seq, stride_out_head, GROUP, HEAD_DIM, BLOCK_H, BLOCK_D
    )


def merge_block_splits(group: int, head_dim: int) -> int:
    """Splits the merge loads per step: up to 4096 float32 partial elements, i.e. 32 registers a thread.

    Not sized to the split count, so one compiled kernel serves every count (masks cover the rest).
    """
    return max(1, min(16, 4096 // (next_power_of_2(group) * next_power_of_2(head_dim))))


_split_counters: dict[tuple[torch.device, int], torch.Tensor] = {}
_retired_counters: list[torch.Tensor] = []  # outgrown, kept for the CUDA graphs that captured them


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 counters for the fused merge, kept per (device, stream) and re-armed by the kernel.

    One buffer per stream, so launches on two streams never share counters; a buffer is only
    ever replaced by a larger one and the old one is kept alive, because a captured CUDA graph
    may still point at it.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _split_counters.get(key)
    if counters is None or counters.numel() < count:
        if counters is not None:
            _retired_counters.append(counters)
        counters = torch.zeros(max(1024, next_power_of_2(count)), dtype=torch.int32, device=device)
        _split_counters[key] = counters
    return counters


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
    num_splits, partition_size = choose_num_splits(
        config, num_seqs, num_kv_heads, max_seq_len, multiprocessor_count(query.device)
    )
    block_d = next_power_of_2(head_dim)
    single = num_splits == 1
    fused = config.fused_merge and not single
    merge_block_h = next_power_of_2(group)
    merge_block_s = merge_block_splits(group, head_dim)
    if single:  # the partial buffers are never touched
        part_acc = part_max = part_sum = out
    else:
        part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        part_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
    counters = split_counters(query.device, num_seqs * num_kv_heads) if fused else seq_lens
    _decode_partition_kernel[(num_kv_heads, num_seqs, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens,
        alibi_slopes if alibi_slopes is not None else query,
        out, part_acc, part_max, part_sum, counters,
        scale * LOG2E, sliding_window or 0, partition_size, num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_M=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=k_cache.shape[1], BLOCK_N=config.block_n,
        USE_ALIBI=alibi_slopes is not None, USE_WINDOW=sliding_window is not None,
        SINGLE_SPLIT=single, FUSED_MERGE=fused, MERGE_BLOCK_H=merge_block_h, MERGE_BLOCK_S=merge_block_s,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if not single and not fused:
        _decode_merge_kernel[(num_kv_heads, num_seqs)](
            out, part_acc, part_max, part_sum, seq_lens, partition_size, num_splits,
            out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim,
            BLOCK_H=merge_block_h, BLOCK_S=merge_block_s, BLOCK_D=block_d,
            num_warps=4,
        )  # fmt: skip
    return out
