"""Names for full KV blocks: a hash chained over the block's tokens and its prefix.

hash(block i) = H(hash(block i-1), tokens of block i), so equal hashes mean
equal token prefixes (up to the collision odds of a 128-bit BLAKE2b digest,
negligible next to hardware errors). Python's hash() would do inside one
process, but BLAKE2b is stable across processes and restarts.
"""

from __future__ import annotations

import hashlib
from array import array

DIGEST_SIZE = 16


def chain_block_hashes(parent: bytes | None, token_ids: list[int], block_size: int) -> list[bytes]:
    """The hashes of the full blocks of token_ids (a partial tail is ignored),
    continuing the chain after the block whose hash is `parent` (None: the first block)."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hashlib.blake2b(digest_size=DIGEST_SIZE)
        h.update(parent or b"")
        h.update(array("q", token_ids[start : start + block_size]).tobytes())
        parent = h.digest()
        hashes.append(parent)
    return hashes
