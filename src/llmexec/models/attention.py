"""Per-step attention metadata and the attention layer that uses the paged KV cache.

AttentionMetadata is built once per step from a StepInput and shared by every
layer; the index tensors the backend gathers with are precomputed here so no
layer repeats that work.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import nn

from llmexec.host_to_device import tensor_to_device, to_device
from llmexec.kernels.backend import paged_attention, reshape_and_cache, uses_triton_on
from llmexec.step import StepInput


@dataclass
class PrefillSpan:
    """One sequence with query_len > 1, attended to on its own."""

    query_start: int  # its first row in the flattened batch
    query_end: int
    seq_len: int
    block_ids: torch.Tensor  # [ceil(seq_len / block_size)] int64, its block table cut to seq_len
    attn_mask: torch.Tensor | None  # [query_len, seq_len] bool; None when query_len == seq_len


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, where this step's K/V go; negative = padding
    query_start_loc: torch.Tensor  # [B+1] int64
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    block_size: int
    # All query_len == 1 sequences, attended to together in one padded batch:
    decode_query_rows: torch.Tensor  # [D] int64, their rows in the flattened batch
    decode_seq_lens: torch.Tensor  # [D] int64, their seq_len: each decode query sits at position seq_len - 1
    decode_block_tables: torch.Tensor  # [D, N] int64, N blocks cover their longest seq_len; padded with 0
    decode_key_mask: torch.Tensor  # [D, 1, 1, N * block_size] bool, True where the position exists
    prefill_spans: list[PrefillSpan]  # empty on the Triton path, which reads query_start_loc instead

    @classmethod
    def build(
        cls, step: StepInput, block_size: int, device: torch.device | str, reference_fields: bool | None = None
    ) -> AttentionMetadata:
        """Make the step's tensors on `device`. Assumes the step was validated.

        On CUDA (the Triton kernels) the fields only the torch reference reads, decode_key_mask and
        prefill_spans, are left empty: each would cost host-to-device copies every step.
        reference_fields=True fills them anyway (to run the reference on CUDA, as a test does).
        """
        for_reference = not uses_triton_on(device) if reference_fields is None else reference_fields
        seqs = step.sequences
        query_lens = [s.query_len for s in seqs]
        seq_lens = [s.seq_len for s in seqs]
        query_start_loc = [0, *accumulate(query_lens)]
        max_blocks = max(1, max(len(s.block_table) for s in seqs))
        block_tables = torch.tensor(
            [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in seqs], dtype=torch.int32
        )

        decodes = [i for i, n in enumerate(query_lens) if n == 1]
        decode_blocks = _num_blocks(max((seq_lens[i] for i in decodes), default=0), block_size)
        decode_len = decode_blocks * block_size
        decode_seq_lens = torch.tensor([seq_lens[i] for i in decodes], dtype=torch.int64)
        decode_key_mask = torch.arange(decode_len if for_reference else 0) < decode_seq_lens[:, None]

        prefill_spans = []
        for i, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
            if query_len == 1 or not for_reference:
                continue
            attn_mask = None
            if query_len != seq_len:  # earlier context in the cache: the causal diagonal is shifted
                query_positions = torch.arange(seq_len - query_len, seq_len)
                attn_mask = (torch.arange(seq_len)[None, :] <= query_positions[:, None]).to(device)
            block_ids = block_tables[i, : _num_blocks(seq_len, block_size)].to(device, torch.int64)
            prefill_spans.append(
                PrefillSpan(query_start_loc[i], query_start_loc[i + 1], seq_len, block_ids, attn_mask)
            )

        # Through pinned memory on CUDA: a pageable copy would wait for the step still running.
        return cls(
            slot_mapping=to_device(step.slot_mapping, device),
            query_start_loc=to_device(query_start_loc, device),
            seq_lens=to_device(seq_lens, device, torch.int32),
            block_tables=tensor_to_device(block_tables, device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=block_size,
            decode_query_rows=to_device([query_start_loc[i] for i in decodes], device),
            decode_seq_lens=tensor_to_device(decode_seq_lens, device),
            decode_block_tables=tensor_to_device(block_tables[decodes, :decode_blocks], device, torch.int64),
            decode_key_mask=tensor_to_device(decode_key_mask.view(len(decodes), 1, 1, decode_key_mask.shape[-1]), device),
            prefill_spans=prefill_spans,
        )


def _num_blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class Attention(nn.Module):
    """Writes this layer's K/V into its paged cache, then attends over the cache. No parameters."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        alibi_slopes: torch.Tensor | None = None,
        sliding_window: int | None = None,
    ) -> None:
        """alibi_slopes: [num_heads] float32 for ALiBi models (BLOOM), which have no rotary.
        sliding_window: W for layers whose queries see only the last W positions (Mistral), else None."""
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.sliding_window = sliding_window

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """query [T, heads*head_dim], key/value [T, kv_heads*head_dim] -> [T, heads*head_dim]."""
        num_tokens = query.shape[0]
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        reshape_and_cache(key, value, k_cache, v_cache, attn_metadata.slot_mapping)
        output = paged_attention(
            query,
            k_cache,
            v_cache,
            attn_metadata,
            self.scale,
            alibi_slopes=self.alibi_slopes,
            sliding_window=self.sliding_window,
        )
        return output.view(num_tokens, self.num_heads * self.head_dim)
