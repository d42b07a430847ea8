"""Qwen2 (and Qwen2.5): Llama with a bias on the q/k/v projections (none on o_proj)."""

from __future__ import annotations

from collections.abc import Mapping

from llmexec.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    @staticmethod
    def projection_biases(config: Mapping) -> tuple[bool, bool]:
        return True, False


class Qwen2ForCausalLM(LlamaForCausalLM):
    attention_class = Qwen2Attention
