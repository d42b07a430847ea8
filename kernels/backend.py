"""One entry point per forward-pass op: the Triton kernels on CUDA, plain torch elsewhere.

The runner calls these instead of choosing an implementation itself. The choice is made
per call from the tensors' device, so one model object works on either. Triton modules are
imported only on the CUDA path: a CPU install needs no triton.

  reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)          in place
  paged_attention(query, k_cache, v_cache, metadata, scale, alibi_slopes=None, sliding_window=None)
      -> [T, heads, head_dim]; metadata is a models.attention.AttentionMetadata
  rms_norm(x, weight, eps)
  fused_add_rms_norm(x, residual, weight, eps) -> (normed, residual)      residual updated in place
  rotary_embedding(positions, query, key, cos_sin_cache)                 query, key rotated in place
  (cos_sin_cache: rotary_table.rotary_cos_sin_cache(inv_freq, max_positions, device), once per model)
"""

from __future__ import annotations

import torch

from llmexec.kernels import torch_reference
from llmexec.kernels.triton_support import triton_available

# reference_ops (the CPU path of the norm and rotary ops) is imported where used: it builds on
# models.layers, which itself dispatches through this module.

_TRITON = triton_available()


def uses_triton(tensor: torch.Tensor) -> bool:
    """True where these ops run Triton kernels for tensors like this one."""
    return tensor.is_cuda and _TRITON


def uses_triton_on(device: torch.device | str) -> bool:
    """True where these ops run Triton kernels for tensors on `device`."""
    return torch.device(device).type == "cuda" and _TRITON


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """key/value [T, kv_heads, head_dim] into the caches [num_blocks, block_size, kv_heads, head_dim]
    at slot_mapping [T] (negative: skipped), in place."""
    if uses_triton(key):
        from llmexec.kernels import triton_cache

        triton_cache.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
    else:
        torch_reference.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal paged attention of the step's flattened batch; the same contract as
    torch_reference.paged_attention (query [T, heads, head_dim] -> [T, heads, head_dim],
    metadata an AttentionMetadata, caches already holding this step's K/V).

    On CUDA this is triton_paged_attention.
    """
    if uses_triton(query):
        return triton_paged_attention(query, k_cache, v_cache, metadata, scale, alibi_slopes, sliding_window)
    return torch_reference.paged_attention(
        query, k_cache, v_cache, metadata, scale, alibi_slopes=alibi_slopes, sliding_window=sliding_window
    )


def triton_paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """paged_attention through the Triton kernels, on any device Triton runs on (the interpreter too).

    A decode-only step runs the split-K decode kernel alone; a step with prefills runs the
    prefill kernel over the prefill sequences and the decode kernel over the decode rows
    (gathered, then scattered back). Reads metadata's query_start_loc, seq_lens, block_tables,
    max_query_len, max_seq_len, decode_query_rows, decode_seq_lens, decode_block_tables.
    """
    from llmexec.kernels.triton_decode import paged_decode_attention
    from llmexec.kernels.triton_prefill import paged_prefill_attention

    options = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window}
    num_seqs = metadata.seq_lens.shape[0]
    if metadata.max_query_len == 1 and query.shape[0] == num_seqs:
        return paged_decode_attention(
            query, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, metadata.max_seq_len, scale, **options
        )
    output = torch.empty_like(query)
    paged_prefill_attention(
        query,
        k_cache,
        v_cache,
        metadata.query_start_loc,
        metadata.seq_lens,
        metadata.block_tables,
        metadata.max_query_len,
        scale,
        skip_single_token=True,
        out=output,
        **options,
    )
    rows = metadata.decode_query_rows
    if rows.numel() > 0:
        decode_tables = metadata.decode_block_tables
        output[rows] = paged_decode_attention(
            query[rows],
            k_cache,
            v_cache,
            decode_tables,
            metadata.decode_seq_lens,
            decode_tables.shape[1] * k_cache.shape[1],  # an upper bound of their seq_len: sizes the splits
            scale,
            **options,
        )
    return output


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [rows, hidden], weight [hidden] -> weight * normalized x (layers.RMSNorm's numerics)."""
    if uses_triton(x):
        from llmexec.kernels import triton_norm

        return triton_norm.rms_norm(x, weight, eps)
    from llmexec.kernels import reference_ops

    return reference_ops.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual in place; returns (rms_norm(residual) * weight, residual)."""
    if uses_triton(x):
        from llmexec.kernels import triton_norm

        return triton_norm.fused_add_rms_norm(x, residual, weight, eps)
    from llmexec.kernels import reference_ops

    normed, summed = reference_ops.fused_add_rms_norm(x, residual, weight, eps)
    residual.copy_(summed)
    return normed, residual


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Rotate the first cos_sin_cache.shape[1] dims of every head of query [T, heads, head_dim] and
    key [T, kv_heads, head_dim] by their token's position [T], in place."""
    if uses_triton(query):
        from llmexec.kernels import triton_rotary

        triton_rotary.rotary_embedding(positions, query, key, cos_sin_cache)
        return
    from llmexec.kernels import reference_ops

    rotated_query, rotated_key = reference_ops.rotary_embedding(positions, query, key, cos_sin_cache)
    query.copy_(rotated_query)
    key.copy_(rotated_key)
