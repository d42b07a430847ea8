"""The KV cache's free-block pool.

The runner's cache holds num_blocks blocks of block_size token slots each. A
sequence owns the blocks in its block_table, in logical order, so token
position p lives in slot block_table[p // block_size] * block_size
+ p % block_size. The invariant the scheduler keeps: a scheduled sequence's
block_table covers all num_tokens of its tokens.

Blocks carry a reference count so that prefix caching can later share full
blocks between sequences: it will hash each full block of a sequence's tokens
in `allocate`, reuse a cached block (ref_count += 1, num_computed_tokens
advanced past it) and only call `_take_block` on a miss.
"""

from __future__ import annotations

from collections import deque

from llmexec.errors import InvalidArgumentError, ResourceExhaustedError
from llmexec.scheduler.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks <= 0:
            raise InvalidArgumentError(f"num_blocks must be > 0, got {num_blocks}")
        if block_size <= 0:
            raise InvalidArgumentError(f"block_size must be > 0, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_tokens_capacity(self) -> int:
        return self.num_blocks * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slot(self, block_table: list[int], position: int) -> int:
        """The cache slot of token `position` of the sequence owning block_table."""
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_blocks_for(seq.num_tokens) <= len(self.free_block_ids)

    def allocate(self, seq: Sequence) -> None:
        """Give seq (holding no blocks) blocks for all its current tokens."""
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        needed = self.num_blocks_for(seq.num_tokens)
        if needed > len(self.free_block_ids):
            raise ResourceExhaustedError(
                f"{seq.request_id} needs {needed} KV blocks, {len(self.free_block_ids)} are free"
            )
        seq.block_table.extend(self._take_block() for _ in range(needed))

    def can_append(self, seq: Sequence) -> bool:
        return self._num_missing_blocks(seq) <= len(self.free_block_ids)

    def may_append(self, seq: Sequence) -> None:
        """Extend seq's block_table to cover all its tokens (one new block when
        its last token starts a block, none otherwise)."""
        missing = self._num_missing_blocks(seq)
        if missing > len(self.free_block_ids):
            raise ResourceExhaustedError(f"{seq.request_id} needs {missing} more KV blocks, none are free")
        seq.block_table.extend(self._take_block() for _ in range(missing))

    def deallocate(self, seq: Sequence) -> None:
        """Return seq's blocks to the pool; its KV is gone, so nothing is computed."""
        # Reversed: the tail blocks return first, so the head blocks (the ones a
        # prefix cache would most likely hit) stay cached the longest.
        for block_id in reversed(seq.block_table):
            self._release_block(block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    def _num_missing_blocks(self, seq: Sequence) -> int:
        return max(0, self.num_blocks_for(seq.num_tokens) - len(seq.block_table))

    def _take_block(self) -> int:
        block_id = self.free_block_ids.popleft()
        assert self.ref_counts[block_id] == 0
        self.ref_counts[block_id] = 1
        return block_id

    def _release_block(self, block_id: int) -> None:
        assert self.ref_counts[block_id] > 0, f"block {block_id} freed twice"
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free_block_ids.append(block_id)
