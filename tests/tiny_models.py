"""Tiny random Hugging Face models for tests: transformers saves them and is the oracle."""

from __future__ import annotations

import torch

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    vocab_size=256,
    max_position_embeddings=256,
)


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32, eval-mode LlamaForCausalLM; overrides change the config."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()
