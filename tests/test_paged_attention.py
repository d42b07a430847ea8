"""The plain-torch paged attention against dense causal attention on contiguous K/V."""

from __future__ import annotations

import pytest
import torch

from llmexec.kernels.torch_reference import paged_attention, reshape_and_cache
from llmexec.models.attention import AttentionMetadata
from llmexec.step import SequenceInput, StepInput

HEAD_DIM = 8
NUM_BLOCKS = 160


def dense_causal_attention(query, key, value, scale, sliding_window=None):
    """query [Q, H, D] at the last Q positions of key/value [S, KV, D] -> [Q, H, D];
    with sliding_window W, a query at position p sees keys (p - W, p] only."""
    query_len, num_heads, _ = query.shape
    seq_len, num_kv_heads, _ = key.shape
    key = key.repeat_interleave(num_heads // num_kv_heads, dim=1)
    value = value.repeat_interleave(num_heads // num_kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query, key) * scale
    query_positions = torch.arange(seq_len - query_len, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > query_positions, float("-inf"))
    if sliding_window is not None:
        scores = scores.masked_fill(torch.arange(seq_len)[None, :] <= query_positions - sliding_window, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), value)


def run_case(seq_shapes, block_size, num_heads, num_kv_heads, seed=0, sliding_window=None):
    """seq_shapes: (query_len, seq_len) per sequence. Returns (paged output, dense output)."""
    gen = torch.Generator().manual_seed(seed)
    free_blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()  # shuffled: tables are not contiguous
    cache_shape = (NUM_BLOCKS, block_size, num_kv_heads, HEAD_DIM)
    # Garbage in every slot: anything attention reads outside a sequence must be masked out.
    k_cache = 1e3 * torch.randn(cache_shape, generator=gen)
    v_cache = 1e3 * torch.randn(cache_shape, generator=gen)
    scale = HEAD_DIM**-0.5

    sequences, queries, keys, values, slot_mapping, expected = [], [], [], [], [], []
    for query_len, seq_len in seq_shapes:
        num_seq_blocks = -(-seq_len // block_size)
        block_table = [free_blocks.pop() for _ in range(num_seq_blocks)]
        slots = [block_table[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        key = torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen)
        value = torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen)
        query = torch.randn(query_len, num_heads, HEAD_DIM, generator=gen)
        context = seq_len - query_len
        # Earlier steps already cached the context; this step brings the rest.
        k_cache.view(-1, num_kv_heads, HEAD_DIM)[slots[:context]] = key[:context]
        v_cache.view(-1, num_kv_heads, HEAD_DIM)[slots[:context]] = value[:context]
        sequences.append(SequenceInput(query_len, seq_len, block_table, needs_sample=True))
        queries.append(query)
        keys.append(key[context:])
        values.append(value[context:])
        slot_mapping += slots[context:]
        expected.append(dense_causal_attention(query, key, value, scale, sliding_window))

    num_tokens = len(slot_mapping)
    step = StepInput([0] * num_tokens, [0] * num_tokens, slot_mapping, sequences)
    metadata = AttentionMetadata.build(step, block_size, "cpu")
    reshape_and_cache(torch.cat(keys), torch.cat(values), k_cache, v_cache, metadata.slot_mapping)
    output = paged_attention(torch.cat(queries), k_cache, v_cache, metadata, scale, sliding_window=sliding_window)
    return output, torch.cat(expected)


MIXED = [(1, 17), (7, 7), (1, 3), (5, 12), (1, 1), (16, 40), (1, 33)]


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_mixed_prefill_and_decode_match_dense(block_size, num_heads, num_kv_heads):
    output, expected = run_case(MIXED, block_size, num_heads, num_kv_heads)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "seq_shapes",
    [
        [(1, 9)],  # decode only
        [(1, 1), (1, 20), (1, 6)],  # decodes of very different lengths share one padded batch
        [(11, 11)],  # prefill only, no context
        [(3, 25), (25, 25)],  # prefill chunks with and without earlier context
    ],
)
def test_decode_only_and_prefill_only_batches(seq_shapes):
    output, expected = run_case(seq_shapes, block_size=5, num_heads=6, num_kv_heads=3, seed=1)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sliding_window", [1, 4, 13])
def test_sliding_window_matches_dense(sliding_window):
    # MIXED has decodes and prefills shorter and longer than each window, with and without context.
    output, expected = run_case(MIXED, 5, 8, 2, seed=2, sliding_window=sliding_window)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    unwindowed, _ = run_case(MIXED, 5, 8, 2, seed=2)
    assert not torch.allclose(output, unwindowed)  # the window did cut keys


def test_reshape_and_cache_writes_slots_and_skips_negative_ones():
    k_cache = torch.randn(4, 3, 2, HEAD_DIM)
    v_cache = torch.randn(4, 3, 2, HEAD_DIM)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    key = torch.randn(3, 2, HEAD_DIM)
    value = torch.randn(3, 2, HEAD_DIM)
    slot_mapping = torch.tensor([7, -1, 2])  # 7 = block 2, offset 1; the middle token is padding

    reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)

    assert torch.equal(k_cache[2, 1], key[0]) and torch.equal(v_cache[2, 1], value[0])
    assert torch.equal(k_cache[0, 2], key[2]) and torch.equal(v_cache[0, 2], value[2])
    written = torch.zeros(4, 3, dtype=torch.bool)
    written[2, 1] = written[0, 2] = True
    assert torch.equal(k_cache[~written], k_before[~written])
    assert torch.equal(v_cache[~written], v_before[~written])


def test_reshape_and_cache_casts_to_cache_dtype():
    k_cache = torch.zeros(2, 4, 1, HEAD_DIM, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(1, 1, HEAD_DIM)
    reshape_and_cache(key, key, k_cache, v_cache, torch.tensor([5]))
    assert torch.equal(k_cache[1, 1], key[0].to(torch.bfloat16))


def test_reshape_and_cache_refuses_a_non_contiguous_cache():
    k_cache = torch.zeros(4, 2, 3, 1, HEAD_DIM)[:, 0]  # every other block row: not viewable as slots
    with pytest.raises(RuntimeError):
        reshape_and_cache(torch.zeros(1, 1, HEAD_DIM), torch.zeros(1, 1, HEAD_DIM), k_cache, k_cache, torch.tensor([0]))
