"""Position information that is not rotary: learned position tables and ALiBi slopes.

(Rotary embeddings, whole and partial, are in layers.py.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LearnedPositionEmbedding(nn.Module):
    """A learned table of position vectors, looked up at `position + offset`.

    GPT-2 uses offset 0; OPT reserves the first 2 rows (a padding-era leftover), so its
    position p reads row p + 2. The table's parameter is `weight`, as in the checkpoint.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, offset: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.offset = offset

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [T] int64 -> [T, embedding_dim]."""
        return F.embedding(positions + self.offset, self.weight)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes [num_heads] float32 on the CPU, as BLOOM (and the paper) define them.

    A power of two n of heads gets the geometric series 2^(-8/n), 2^(-16/n), ...; other counts
    take the series of the power of two below and fill the rest with every other slope of
    the series for twice that many heads. Computed in float32, like transformers, so the
    biases match bit for bit.
    """
    closest_power_of_2 = 2 ** math.floor(math.log2(num_heads))
    # device="cpu" explicitly: models build their modules under a "meta" default device.
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest_power_of_2) - 3))), dtype=torch.float32, device="cpu")
    slopes = base ** torch.arange(1, 1 + closest_power_of_2, dtype=torch.int32, device="cpu")
    if closest_power_of_2 != num_heads:
        extra_base = torch.tensor(
            2 ** (-(2 ** -(math.log2(2 * closest_power_of_2) - 3))), dtype=torch.float32, device="cpu"
        )
        num_remaining = min(closest_power_of_2, num_heads - closest_power_of_2)
        extra_powers = torch.arange(1, 1 + 2 * num_remaining, 2, dtype=torch.int32, device="cpu")
        slopes = torch.cat([slopes, extra_base**extra_powers])
    return slopes
