"""Plain-torch paged-attention kernels: the reference every faster kernel is tested against.

The KV cache of one layer is two tensors [num_blocks, block_size, kv_heads, head_dim].
A token's slot is block_id * block_size + offset, so viewing the cache as
[num_blocks * block_size, kv_heads, head_dim] turns a slot into a row index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's key and value into its cache slot, in place.

    key, value: [T, kv_heads, head_dim]
    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim], contiguous
    slot_mapping: [T] int64; a negative slot marks a padding token, which is skipped.
    """
    # view (not reshape): a non-contiguous cache must fail here, not be silently copied.
    k_rows = k_cache.view(-1, *k_cache.shape[2:])
    v_rows = v_cache.view(-1, *v_cache.shape[2:])
    is_real = slot_mapping >= 0
    if not bool(is_real.all()):
        key, value, slot_mapping = key[is_real], value[is_real], slot_mapping[is_real]
    k_rows.index_copy_(0, slot_mapping, key.to(k_rows.dtype))
    v_rows.index_copy_(0, slot_mapping, value.to(v_rows.dtype))


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention over a flattened variable-length batch, keys read from the paged cache.

    query: [T, heads, head_dim]; heads is a multiple of kv_heads (grouped-query attention:
        query head h reads kv head h // (heads // kv_heads)).
    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim], already holding this
        step's keys and values (call reshape_and_cache first).
    metadata: an llmexec.models.attention.AttentionMetadata; this function reads its
        decode_query_rows [D], decode_block_tables [D, N], decode_key_mask [D, 1, 1, N * block_size]
        and prefill_spans (query_start, query_end, seq_len, block_ids, attn_mask [Q, S] or None);
        with alibi_slopes or sliding_window also decode_seq_lens [D].
    alibi_slopes: [heads] float32 or None. ALiBi adds slope * (key_pos - query_pos) to each
        head's scores before the softmax (a penalty growing with distance; BLOOM's only
        position signal).
    sliding_window: W or None. A query at position p sees only keys at positions (p - W, p]
        (Mistral; transformers' sliding_window_overlay); the cache still holds every key.
    Returns [T, heads, head_dim] in query's dtype.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    output = torch.empty_like(query)

    rows = metadata.decode_query_rows
    if rows.numel() > 0:
        # Each decode query attends to its whole sequence, so the group of query heads
        # sharing a kv head plays the part of SDPA's "query length": [D, kv_heads, group, head_dim].
        num_decodes = rows.shape[0]
        # Decode rows are distinct and sorted, so D == T means rows is arange(T): an all-decode
        # step (the common one) reads and writes the query rows in place, skipping two copies.
        all_decode = num_decodes == query.shape[0]
        q = (query if all_decode else query[rows]).view(num_decodes, num_kv_heads, group, head_dim)
        k = _gather_blocks(k_cache, metadata.decode_block_tables).to(query.dtype).transpose(1, 2)  # [D, kv, L, hd]
        v = _gather_blocks(v_cache, metadata.decode_block_tables).to(query.dtype).transpose(1, 2)
        mask = metadata.decode_key_mask
        if sliding_window is not None:
            in_window = _key_distance(metadata.decode_seq_lens - 1, mask.shape[-1]) > -sliding_window  # [D, L]
            mask = mask & in_window.view(mask.shape)
        if alibi_slopes is not None:
            # [D, 1, 1, L] -> [D, kv_heads, group, L]: the "query length" axis is the head group.
            distance = _key_distance(metadata.decode_seq_lens - 1, mask.shape[-1])[:, None, :]  # [D, 1, L]
            mask = _alibi_bias(alibi_slopes, distance, mask.view(num_decodes, 1, -1), query.dtype)
            mask = mask.view(num_decodes, num_kv_heads, group, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        if all_decode:
            return out.reshape(num_decodes, num_heads, head_dim)
        output[rows] = out.reshape(num_decodes, num_heads, head_dim)

    for span in metadata.prefill_spans:
        q = query[span.query_start : span.query_end]
        query_len, seq_len = q.shape[0], span.seq_len
        q = q.view(query_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [kv_heads, group, Q, hd]
        # expand, not repeat: the group axis of K/V is a stride-0 view, no copy.
        k = _gather_blocks(k_cache, span.block_ids)[:seq_len].to(query.dtype).transpose(0, 1).unsqueeze(1)
        v = _gather_blocks(v_cache, span.block_ids)[:seq_len].to(query.dtype).transpose(0, 1).unsqueeze(1)
        k = k.expand(num_kv_heads, group, seq_len, head_dim)
        v = v.expand(num_kv_heads, group, seq_len, head_dim)
        attn_mask = span.attn_mask
        if sliding_window is not None and seq_len > sliding_window:  # else every key is inside the window
            distance = _key_distance(torch.arange(seq_len - query_len, seq_len, device=query.device), seq_len)
            attn_mask = (distance <= 0) & (distance > -sliding_window)  # [Q, S]
        if alibi_slopes is not None:
            query_positions = torch.arange(seq_len - query_len, seq_len, device=query.device)
            distance = _key_distance(query_positions, seq_len)  # [Q, S]
            allowed = distance <= 0 if attn_mask is None else attn_mask
            bias = _alibi_bias(alibi_slopes, distance[None], allowed[None], query.dtype)  # [heads, Q, S]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.view(num_kv_heads, group, query_len, seq_len), scale=scale
            )
        elif attn_mask is None:  # no earlier context: plain top-left causal mask
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        output[span.query_start : span.query_end] = out.permute(2, 0, 1, 3).reshape(query_len, num_heads, head_dim)
    return output


def _key_distance(query_positions: torch.Tensor, key_len: int) -> torch.Tensor:
    """query_positions [...] -> key_pos - query_pos [..., key_len] (float32; <= 0 for keys at or before the query)."""
    key_positions = torch.arange(key_len, device=query_positions.device, dtype=torch.float32)
    return key_positions - query_positions[..., None].float()


def _alibi_bias(slopes: torch.Tensor, distance: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """slopes [H], distance and allowed [B, Q, L] -> additive mask [B, H, Q, L] in dtype, -inf where not allowed."""
    bias = slopes.float()[None, :, None, None] * distance[:, None]
    return bias.masked_fill(~allowed[:, None], float("-inf")).to(dtype)


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, kv_heads, hd], block_ids [..., N] -> keys [..., N * block_size, kv_heads, hd].

    Gathering whole blocks moves the same bytes as gathering slots but with block_size
    times fewer indices; about twice as fast on CPU. index_select on the flattened ids is
    about three times faster than advanced indexing (cache[block_ids]) on CPU.
    """
    gathered = cache.index_select(0, block_ids.reshape(-1))
    return gathered.view(*block_ids.shape[:-1], -1, *cache.shape[2:])
