"""Qwen3: Llama with an RMSNorm over each query and key head before rotary (and an explicit head_dim)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llmexec.models.layers import RMSNorm
from llmexec.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: Mapping, head_dim: int, sliding_window: int | None) -> None:
        super().__init__(config, head_dim, sliding_window)
        eps = config.get("rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def norm_query_key(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(query), self.k_norm(key)


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_class = Qwen3Attention
