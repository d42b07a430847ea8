"""KV blocks: allocation covers every token, blocks come back, and full blocks
are shared through the prefix cache and evicted least-recently-used only when
no plain free block is left."""

from __future__ import annotations

import pytest

from llmexec.errors import InvalidArgumentError
from llmexec.scheduler.block_hash import chain_block_hashes
from llmexec.scheduler.block_manager import BlockManager
from llmexec.scheduler.sequence import Sequence


def seq_of(num_tokens: int, request_id: str = "r", start: int = 100) -> Sequence:
    return Sequence(request_id=request_id, prompt_token_ids=list(range(start, start + num_tokens)))


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Admit seq as the scheduler does (prefix hits, then the rest) and mark it computed."""
    hits = bm.computed_prefix(seq)
    assert bm.allocate_slots(seq, seq.num_tokens - len(hits) * bm.block_size, hits)
    seq.num_computed_tokens = seq.num_tokens


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_allocate_covers_every_token(block_size):
    bm = BlockManager(num_blocks=64, block_size=block_size)
    seq = seq_of(33)
    assert bm.allocate_slots(seq, 33)
    assert len(seq.block_table) == -(-33 // block_size)
    assert bm.num_free_blocks == 64 - len(seq.block_table)
    assert len(set(seq.block_table)) == len(seq.block_table)
    slots = [bm.slot(seq.block_table, p) for p in range(33)]
    assert len(set(slots)) == 33 and all(0 <= s < 64 * block_size for s in slots)


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_a_decode_adds_a_block_only_when_its_token_starts_one(block_size):
    bm = BlockManager(num_blocks=64, block_size=block_size)
    seq = seq_of(3)
    compute_all(bm, seq)
    for _ in range(40):
        seq.output_token_ids.append(7)  # the sampled token, whose KV the next step writes
        before = len(seq.block_table)
        starts_block = (seq.num_tokens - 1) % block_size == 0
        assert bm.allocate_slots(seq, 1)
        seq.num_computed_tokens += 1
        assert len(seq.block_table) == before + (1 if starts_block else 0)
        assert len(seq.block_table) * block_size >= seq.num_tokens
    assert bm.num_free_blocks == 64 - len(seq.block_table)


def test_free_returns_every_block_and_out_of_blocks_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    a, big = seq_of(9, "a"), seq_of(13, "big")
    assert not bm.allocate_slots(big, 13)
    assert bm.num_free_blocks == 3 and big.block_table == []
    compute_all(bm, a)
    assert bm.usage == 1.0
    a.output_token_ids += [1, 2, 3, 4]
    assert not bm.allocate_slots(a, 4)  # a 4th block does not exist
    assert len(a.block_table) == 3
    bm.free(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    assert bm.num_free_blocks == 3 and bm.usage == 0.0
    bm.free(a)  # nothing held: nothing to free


def test_hash_chain_names_prefixes_not_blocks():
    first = chain_block_hashes(None, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(first) == 2  # the partial tail has no hash
    assert chain_block_hashes(None, [1, 2, 3, 4, 0, 0, 0, 0], 4)[0] == first[0]
    assert chain_block_hashes(None, [9, 9, 9, 9, 5, 6, 7, 8], 4)[1] != first[1]  # same tokens, other prefix
    assert chain_block_hashes(first[0], [5, 6, 7, 8], 4) == first[1:]


def test_shared_prefix_is_taken_by_reference_and_last_token_is_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq_of(10, "a")
    compute_all(bm, a)  # blocks 0, 1 full and cached; block 2 partial
    b = Sequence("b", a.prompt_token_ids[:8] + [555, 556])
    hits = bm.computed_prefix(b)
    assert hits == a.block_table[:2]
    assert bm.allocate_slots(b, 2, hits)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    assert bm.num_used_blocks == 4

    # A prompt that is exactly the cached blocks still computes its last token.
    c = Sequence("c", a.prompt_token_ids[:8])
    assert bm.computed_prefix(c) == a.block_table[:1]
    assert bm.num_hit_tokens == 8 and bm.num_queried_tokens == 20


def test_freed_cached_blocks_serve_hits_until_evicted_lru_and_only_when_needed():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = seq_of(8, "a", start=100), seq_of(8, "b", start=200)
    compute_all(bm, a)
    compute_all(bm, b)
    a_blocks = list(a.block_table)
    bm.free(a)  # a's blocks are freed first: least recently used
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4 and bm.usage == 0.0

    c = seq_of(8, "c", start=300)  # two plain free blocks remain: no eviction yet
    compute_all(bm, c)
    assert bm.num_evictions == 0 and bm.num_cached_blocks == 6
    again = seq_of(9, "a-again", start=100)
    assert len(bm.computed_prefix(again)) == 2

    d = seq_of(4, "d", start=400)  # the pool is cached blocks only: evict the least recently freed
    compute_all(bm, d)
    assert bm.num_evictions == 1
    b_again = seq_of(9, "b-again", start=200)
    assert len(bm.computed_prefix(b_again)) == 2  # b's blocks were freed later: kept
    assert bm.computed_prefix(seq_of(9, "a3", start=100)) == [a_blocks[0]]  # a's tail block went first


def test_reset_prefix_cache_forgets_every_hash():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of(12, "a")
    compute_all(bm, a)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8
    assert bm.computed_prefix(seq_of(12, "again")) == []


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    compute_all(bm, seq_of(12, "a"))
    assert bm.computed_prefix(seq_of(12, "b")) == [] and bm.num_cached_blocks == 0


def test_rejects_bad_sizes():
    with pytest.raises(InvalidArgumentError):
        BlockManager(num_blocks=0)
    with pytest.raises(InvalidArgumentError):
        BlockManager(num_blocks=4, block_size=0)
