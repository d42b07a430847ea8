"""GGUF Q4_0 / Q4_1 blocks as int4 components, bit for bit: no dequantize-and-requantize.

A block is 32 consecutive values of a row: fp16 `d` (and fp16 `m` for Q4_1) then
16 bytes whose low nibbles hold values 0..15 and high nibbles values 16..31.
Q4_0: w = d * (q - 8) = q * d + (-8 d); Q4_1: w = q * d + m. Both are the int4
form with group size 32, scale d and offset -8d (exact in fp16) or m.
"""

from __future__ import annotations

import numpy as np
import torch

from llmexec.quantization import CODES, OFFSET, SCALE
from llmexec.quantization.int4 import pack_nibbles

BLOCK_VALUES = 32
# type -> (bytes per block, byte offset of the nibbles)
BLOCK_LAYOUT = {"Q4_0": (18, 2), "Q4_1": (20, 4)}


def gguf_q4_components(raw: np.ndarray, qtype: str, in_features: int) -> dict[str, torch.Tensor]:
    """raw uint8 [rows, in / 32 * block bytes] of a Q4_0 / Q4_1 tensor -> int4 components [rows, ...]."""
    block_bytes, nibbles_at = BLOCK_LAYOUT[qtype]
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, in_features // BLOCK_VALUES, block_bytes)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])
    nibbles = torch.from_numpy(blocks[..., nibbles_at : nibbles_at + 16].copy())
    codes = torch.cat((nibbles & 0xF, nibbles >> 4), dim=-1).reshape(rows, in_features)
    if qtype == "Q4_0":
        offset = d * -8  # a power of two: exact in fp16
    else:
        offset = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
    return {CODES: pack_nibbles(codes), SCALE: d, OFFSET: offset}
