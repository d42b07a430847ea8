"""Mixture of experts: a top-k router over experts whose weights are stacked in [num_experts, ...] tensors.

Stacking (rather than one nn.Linear per expert) keeps each layer's experts in
two contiguous tensors that the loader fills from the checkpoint's per-expert
tensors (`StackedExperts` tells its weight plan how), and that a grouped GEMM
kernel can later read as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StackedExperts:
    """How a checkpoint's per-expert tensors become stacked parameters (read by the loader's weight plan).

    `<prefix>.<checkpoint_module>.<e>.<part>.weight` fills a row block of
    `<prefix>.<model_module>.<param>`[e]; `params` maps each stacked parameter to
    its parts in row order, e.g. {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)};
    `num_experts_key` names the config entry holding the expert count.
    """

    checkpoint_module: str
    model_module: str
    params: Mapping[str, tuple[str, ...]]
    num_experts_key: str


class GatedExperts(nn.Module):
    """num_experts SiLU-gated MLPs. gate_up_proj [E, 2 * intermediate, hidden] (gate rows first),
    down_proj [E, hidden, intermediate]; transformers' MixtralExperts names and layout."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)

    def forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden], expert_ids / expert_weights [T, k] -> sum of each token's k weighted experts [T, hidden]."""
        output = torch.zeros_like(hidden)
        # Only experts some token picked run; each runs once on all its tokens. Ascending
        # expert order, like transformers, so every token's sum adds in the same order.
        for expert in expert_ids.unique().tolist():
            token_rows, choice = torch.where(expert_ids == expert)
            gate, up = F.linear(hidden[token_rows], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(F.silu(gate) * up, self.down_proj[expert])
            output.index_add_(0, token_rows, (expert_out * expert_weights[token_rows, choice, None]).to(output.dtype))
        return output


class SparseMoE(nn.Module):
    """Mixtral's sparse MLP: softmax router, top-k experts per token, weights renormalised over the k."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        self.experts = GatedExperts(num_experts, hidden_size, intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden] -> [T, hidden]; routing probabilities in float32 as transformers does."""
        probs = F.softmax(self.gate(hidden).float(), dim=-1)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(hidden, expert_ids, weights)
