"""The cos/sin table the rotary kernels index by position, built once per model."""

from __future__ import annotations

import torch


def rotary_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, device: torch.device | str) -> torch.Tensor:
    """[max_positions, rotary_dim] float32: cos(p * inv_freq) then sin(p * inv_freq) in row p.

    inv_freq: [rotary_dim // 2], as layers.RotaryEmbedding holds it; the angles are formed in
    float32 the way it forms them, so both paths rotate by the same angles.
    """
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq.float().cpu()[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
