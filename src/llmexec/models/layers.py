"""Layers shared by decoder-only architectures: RMSNorm, rotary embedding, SiLU-gated MLP.

Parameters are created on whatever device is current (the models build them on
"meta") and replaced by checkpoint tensors in load_weights; the numerics follow
transformers' Llama so logits match it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmexec.errors import UnsupportedArchitectureError
from llmexec.kernels import backend
from llmexec.kernels.rotary_table import rotary_cos_sin_cache

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> same shape and dtype; the variance is taken in float32."""
        if backend.uses_triton(hidden):  # one kernel, same numerics
            rows = hidden.reshape(-1, hidden.shape[-1])
            return backend.rms_norm(rows, self.weight, self.eps).view(hidden.shape)
        input_dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(input_dtype)


class GatedMLP(nn.Module):
    """down_proj(silu(gate) * up), gate and up from one fused gate_up_proj matmul.

    gate_up_proj.weight is [2 * intermediate, hidden], gate rows first: the loader's
    weight plan stacks the checkpoint's gate_proj and up_proj into it (Phi-3 ships it fused).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def rope_settings(config: Mapping) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from an HF config dict.

    transformers >= 5 writes one `rope_parameters` dict; older config.json files
    have `rope_theta` and `rope_scaling`. Both are accepted.
    """
    params = config.get("rope_parameters")
    if params:
        theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
        scaling = {key: value for key, value in params.items() if key != "rope_theta"}
    else:
        theta = float(config.get("rope_theta", 10000.0))
        scaling = dict(config["rope_scaling"]) if config.get("rope_scaling") else None
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping | None, max_position_embeddings: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] float32 on the CPU, as transformers computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling, max_position_embeddings)
    raise UnsupportedArchitectureError(
        f"rope scaling type {rope_type!r} is not supported yet (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: Mapping, max_position_embeddings: int) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling.get("original_max_position_embeddings", max_position_embeddings)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Llama-style (rotate-half) rotary embedding over the whole head_dim."""

    def __init__(self, head_dim: int, theta: float, scaling: Mapping | None, max_position_embeddings: int) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_positions = max_position_embeddings

    def cos_sin_cache(self, device: torch.device) -> torch.Tensor:
        """The [max_positions, rotary_dim] float32 table the Triton kernel reads, built once per device."""
        table = getattr(self, "_cos_sin_cache", None)
        if table is None or table.device != device:
            table = self._cos_sin_cache = rotary_cos_sin_cache(self.inv_freq, self.max_positions, device)
        return table

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, head_dim] in `dtype`; computed once per step."""
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim], cos/sin [T, head_dim] -> rotated x, same shape."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Partial rotary (GPT-NeoX's rotary_pct): rotate the first rotary_dim = cos.shape[-1] dims of
    each head, pass the rest through. x [T, heads, head_dim], cos/sin [T, rotary_dim] -> same shape as x."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)


class StepRotary:
    """One step's rotary, shared by every layer: apply(query, key) rotates the first rotary_dim
    dims of each head by its token's position.

    On CUDA the Triton kernel rotates in place from a float32 cos/sin table indexed by position
    (no per-step tables, nothing the CUDA graphs would have to re-capture); elsewhere the
    torch path computes (cos, sin) once per step, as transformers does.
    """

    def __init__(self, rotary_emb: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> None:
        self.positions = positions
        if backend.uses_triton(positions):
            self.cos_sin_cache = rotary_emb.cos_sin_cache(positions.device)
        else:
            self.cos_sin_cache = None
            self.cos, self.sin = rotary_emb(positions, dtype)

    def apply(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [T, heads, head_dim], key [T, kv_heads, head_dim] -> rotated (same shapes; in place on CUDA)."""
        if self.cos_sin_cache is not None:
            backend.rotary_embedding(self.positions, query, key, self.cos_sin_cache)
            return query, key
        return apply_partial_rotary(query, self.cos, self.sin), apply_partial_rotary(key, self.cos, self.sin)
