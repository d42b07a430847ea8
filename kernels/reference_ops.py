"""Plain-torch references for the Triton kernels that torch_reference does not cover.

They take the same raw tensors as the kernels (query_start_loc, seq_lens, block_tables),
compute in float32 one sequence at a time, and favour being obviously right over speed.
reshape_and_cache's reference is torch_reference.reshape_and_cache.
"""

from __future__ import annotations

import torch

from llmexec.models.layers import apply_partial_rotary


def paged_attention_varlen(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of a flattened varlen batch over paged K/V; decode is query_len 1.

    query [T, heads, head_dim]; sequence i owns rows query_start_loc[i]:query_start_loc[i+1],
    its last query_len positions. A query at p sees keys j <= p, and with sliding_window W
    only j > p - W; ALiBi adds slope[h] * (j - p). Returns [T, heads, head_dim] in query's dtype.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    output = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        first, last = starts[i], starts[i + 1]
        query_len = last - first
        if query_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[i, :num_blocks].long()
        keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        keys = keys.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[first:last].float(), keys) * scale
        query_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)[:, None]
        key_pos = torch.arange(seq_len, device=query.device)[None, :]
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.float()[:, None, None] * (key_pos - query_pos).float()
        allowed = key_pos <= query_pos
        if sliding_window is not None:
            allowed = allowed & (key_pos > query_pos - sliding_window)
        scores = scores.masked_fill(~allowed, float("-inf"))
        output[first:last] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values).to(query.dtype)
    return output


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """layers.RMSNorm.forward with `weight` given: variance in float32, weight times the row in x's dtype."""
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum in x's dtype as the unfused layers compute it."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place: (rotated query, rotated key), through layers.apply_partial_rotary in float32.

    cos_sin_cache [max_positions, rotary_dim]: cos half then sin half, as rotary_cos_sin_cache builds it.
    """
    cos_half, sin_half = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)
    cos, sin = torch.cat((cos_half, cos_half), dim=-1), torch.cat((sin_half, sin_half), dim=-1)
    rotated_query = apply_partial_rotary(query.float(), cos, sin).to(query.dtype)
    rotated_key = apply_partial_rotary(key.float(), cos, sin).to(key.dtype)
    return rotated_query, rotated_key
