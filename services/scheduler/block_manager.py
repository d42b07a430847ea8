"""The KV cache's blocks: who holds which, and which full blocks are cached.

The runner's cache holds num_blocks blocks of block_size token slots each. A
sequence owns the blocks in its block_table, in logical order, so token
position p lives in slot block_table[p // block_size] * block_size
+ p % block_size. The invariant the scheduler keeps: a scheduled sequence's
block_table covers its computed tokens plus the ones scheduled this step.

Prefix caching (as vLLM's v1 KV cache manager): a full block is named by a hash
chained over its tokens and every token before it (block_hash.py), so two
sequences with the same first k * block_size tokens have the same first k
hashes. A full block's hash is registered when the step that fills it is
scheduled; a later sequence whose prefix hashes match takes those blocks by
reference (ref_count += 1) and skips computing them. A sequence reaching the
cache through its whole prompt still computes its last token, so the step has
logits to sample from.

Freed blocks keep their contents and hash: a block whose ref_count drops to 0
goes to the evictable queue if it is cached, else to the plain free queue.
New blocks come from the plain queue first; only when it is empty is the
least recently freed cached block evicted (its hash forgotten) and reused.
Both queues count as free: usage is the share of blocks with ref_count > 0.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from llmexec.errors import InvalidArgumentError
from llmexec.scheduler.block_hash import chain_block_hashes
from llmexec.scheduler.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise InvalidArgumentError(f"num_blocks must be > 0, got {num_blocks}")
        if block_size <= 0:
            raise InvalidArgumentError(f"block_size must be > 0, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks  # of the tokens a cached block holds
        self.cached_block_ids: dict[bytes, int] = {}  # hash -> the block holding it
        self.plain_free_ids: deque[int] = deque(range(num_blocks))
        self.evictable_ids: OrderedDict[int, None] = OrderedDict()  # cached, ref 0; least recent first
        # Prefix-cache counters (tokens), as vLLM's prefix_cache_queries / _hits.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.plain_free_ids) + len(self.evictable_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached_block_ids)

    @property
    def usage(self) -> float:
        """Share of blocks held by some sequence, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_tokens_capacity(self) -> int:
        return self.num_blocks * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slot(self, block_table: list[int], position: int) -> int:
        """The cache slot of token `position` of the sequence owning block_table."""
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    def computed_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding seq's longest cached prefix, in order; changes nothing.

        At most (num_tokens - 1) // block_size blocks, so the last token is computed.
        """
        if not self.enable_prefix_caching:
            return []
        hits = []
        for block_hash in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block_id = self.cached_block_ids.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        """Make seq's block_table cover num_new_tokens more tokens past its computed ones.

        computed_blocks (from computed_prefix, for a sequence holding no blocks)
        are taken by reference first and count as computed. Returns False, and
        changes nothing, when too few blocks are free.
        """
        if computed_blocks:
            assert not seq.block_table, f"{seq.request_id} already holds blocks"
        num_hit_tokens = len(computed_blocks) * self.block_size
        num_total = seq.num_computed_tokens + num_hit_tokens + num_new_tokens
        num_needed = self.num_blocks_for(num_total) - len(seq.block_table) - len(computed_blocks)
        # Hits sitting in the evictable queue leave the free pool when taken.
        num_free = self.num_free_blocks - sum(1 for b in computed_blocks if self.ref_counts[b] == 0)
        if num_needed > num_free:
            return False
        if not seq.block_table:  # the first allocation since seq was admitted or lost its blocks
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += num_hit_tokens
            seq.num_cached_tokens = max(seq.num_cached_tokens, num_hit_tokens)
        for block_id in computed_blocks:
            if self.ref_counts[block_id] == 0:
                del self.evictable_ids[block_id]
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        seq.num_computed_tokens += num_hit_tokens
        seq.num_registered_blocks = max(seq.num_registered_blocks, len(computed_blocks))
        seq.block_table.extend(self._take_block() for _ in range(max(0, num_needed)))
        # A step planned ahead covers a token not sampled yet: its block is hashed on a later call.
        self._register_full_blocks(seq, min(num_total, seq.num_tokens))
        return True

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; its computed tokens are no longer in its cache."""
        # Reversed: a sequence's tail blocks become evictable before its head
        # blocks, which other sequences are the likeliest to share.
        for block_id in reversed(seq.block_table):
            self._release_block(block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (the KV cache's contents were lost). Held blocks stay held."""
        for block_id in self.evictable_ids:
            self.plain_free_ids.append(block_id)
        self.evictable_ids.clear()
        self.cached_block_ids.clear()
        self.block_hash = [None] * self.num_blocks

    def num_empty_slots(self, seqs: Iterable[Sequence]) -> int:
        """Slots of held blocks that hold no token: the tail of each sequence's last block.

        Only full blocks are shared, so the partial tails are counted once each.
        """
        return sum(len(s.block_table) * self.block_size - s.num_computed_tokens for s in seqs if s.block_table)

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The hashes of seq's first num_blocks full blocks, computed once per sequence."""
        if len(seq.block_hashes) < num_blocks:
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            start = len(seq.block_hashes) * self.block_size
            tokens = seq.token_ids_slice(start, num_blocks * self.block_size)
            seq.block_hashes.extend(chain_block_hashes(parent, tokens, self.block_size))
        return seq.block_hashes[:num_blocks]

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Cache the blocks that the first num_tokens tokens fill completely."""
        if not self.enable_prefix_caching:
            return
        num_full = num_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block_id, block_hash = seq.block_table[i], hashes[i]
            # A block computed again while the same tokens sit cached elsewhere stays a private copy.
            if self.block_hash[block_id] is None and block_hash not in self.cached_block_ids:
                self.block_hash[block_id] = block_hash
                self.cached_block_ids[block_hash] = block_id
        seq.num_registered_blocks = num_full

    def _take_block(self) -> int:
        if self.plain_free_ids:
            block_id = self.plain_free_ids.popleft()
        else:
            block_id, _ = self.evictable_ids.popitem(last=False)
            del self.cached_block_ids[self.block_hash[block_id]]
            self.block_hash[block_id] = None
            self.num_evictions += 1
        assert self.ref_counts[block_id] == 0
        self.ref_counts[block_id] = 1
        return block_id

    def _release_block(self, block_id: int) -> None:
        assert self.ref_counts[block_id] > 0, f"block {block_id} freed twice"
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            if self.block_hash[block_id] is not None:
                self.evictable_ids[block_id] = None  # most recently used: evicted last
            else:
                self.plain_free_ids.append(block_id)
