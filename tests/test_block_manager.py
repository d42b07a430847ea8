"""The free-block pool: allocation covers every token, appends add a block only
when a token starts one, and every block comes back."""

from __future__ import annotations

import pytest

from llmexec.errors import InvalidArgumentError, ResourceExhaustedError
from llmexec.scheduler.block_manager import BlockManager
from llmexec.scheduler.sequence import Sequence


def seq_of(num_tokens: int, request_id: str = "r") -> Sequence:
    return Sequence(request_id=request_id, prompt_token_ids=list(range(100, 100 + num_tokens)))


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_allocate_covers_every_token(block_size):
    bm = BlockManager(num_blocks=64, block_size=block_size)
    seq = seq_of(33)
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == -(-33 // block_size)
    assert bm.num_free_blocks == 64 - len(seq.block_table)
    assert all(0 <= b < 64 for b in seq.block_table)
    assert len(set(seq.block_table)) == len(seq.block_table)
    slots = [bm.slot(seq.block_table, p) for p in range(33)]
    assert len(set(slots)) == 33 and all(0 <= s < 64 * block_size for s in slots)


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_may_append_adds_a_block_only_when_a_token_starts_one(block_size):
    bm = BlockManager(num_blocks=64, block_size=block_size)
    seq = seq_of(3)
    bm.allocate(seq)
    for _ in range(40):
        seq.output_token_ids.append(7)  # the sampled token, whose KV the next step writes
        before = len(seq.block_table)
        starts_block = (seq.num_tokens - 1) % block_size == 0
        assert bm.can_append(seq)
        bm.may_append(seq)
        assert len(seq.block_table) == before + (1 if starts_block else 0)
        assert len(seq.block_table) * block_size >= seq.num_tokens
    assert bm.num_free_blocks == 64 - len(seq.block_table)


def test_deallocate_returns_every_block_and_resets_computed():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq_of(9, "a"), seq_of(4, "b")
    bm.allocate(a)
    bm.allocate(b)
    a.num_computed_tokens = 9
    assert bm.num_free_blocks == 8 - 3 - 1
    assert not set(a.block_table) & set(b.block_table)
    bm.deallocate(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    bm.deallocate(b)
    bm.deallocate(b)  # nothing held: nothing to free
    assert bm.num_free_blocks == 8
    assert sorted(bm.free_block_ids) == list(range(8))


def test_out_of_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    big = seq_of(9)
    assert not bm.can_allocate(big)
    with pytest.raises(ResourceExhaustedError):
        bm.allocate(big)
    assert bm.num_free_blocks == 2

    seq = seq_of(8)
    bm.allocate(seq)
    assert bm.can_append(seq)  # 8 tokens fill two blocks exactly: no append needed yet
    seq.output_token_ids.append(1)
    assert not bm.can_append(seq)
    with pytest.raises(ResourceExhaustedError):
        bm.may_append(seq)


def test_rejects_bad_sizes():
    with pytest.raises(InvalidArgumentError):
        BlockManager(num_blocks=0)
    with pytest.raises(InvalidArgumentError):
        BlockManager(num_blocks=4, block_size=0)
