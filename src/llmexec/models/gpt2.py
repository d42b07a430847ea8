"""GPT-2 for a flattened, paged batch: learned positions, fused c_attn, Conv1D weights, tied head.

GPT-2's Conv1D stores weights [in_features, out_features] (the transpose of nn.Linear);
the checkpoint tensors are used as they are, as the right operand of the matmul.
Module and parameter names mirror transformers' GPT2LMHeadModel.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmexec.errors import UnsupportedArchitectureError
from llmexec.models.activations import activation
from llmexec.models.attention import Attention, AttentionMetadata
from llmexec.models.positional import LearnedPositionEmbedding
from llmexec.models.weight_binding import bind_checkpoint_tensors, with_prefix

# The causal-mask buffers original checkpoints saved ("h.0.attn.bias", "h.0.attn.masked_bias").
_SAVED_MASK = re.compile(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias")


class Conv1D(nn.Module):
    """x @ weight + bias with weight [in_features, out_features], GPT-2's layout."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class GPT2Attention(nn.Module):
    def __init__(self, config: Mapping, layer_idx: int) -> None:
        super().__init__()
        hidden_size, num_heads = config["hidden_size"], config["num_attention_heads"]
        head_dim = hidden_size // num_heads
        scale = head_dim**-0.5 if config.get("scale_attn_weights", True) else 1.0
        if config.get("scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.hidden_size = hidden_size
        self.c_attn = Conv1D(hidden_size, 3 * hidden_size)  # columns: all of q, then k, then v
        self.c_proj = Conv1D(hidden_size, hidden_size)
        self.attn = Attention(num_heads, num_heads, head_dim, scale)

    def forward(self, hidden, attn_metadata: AttentionMetadata, kv_cache) -> torch.Tensor:
        query, key, value = self.c_attn(hidden).split(self.hidden_size, dim=-1)
        # Column slices, not copies: each row's features are contiguous, so the attention can view heads.
        output = self.attn(query, key, value, attn_metadata, kv_cache)
        return self.c_proj(output)


class GPT2MLP(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        hidden_size = config["hidden_size"]
        intermediate_size = config.get("intermediate_size") or 4 * hidden_size
        self.c_fc = Conv1D(hidden_size, intermediate_size)
        self.c_proj = Conv1D(intermediate_size, hidden_size)
        self.act = activation(config.get("activation_function", "gelu_new"))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(hidden)))


class GPT2Block(nn.Module):
    def __init__(self, config: Mapping, layer_idx: int) -> None:
        super().__init__()
        hidden_size, eps = config["hidden_size"], config.get("layer_norm_epsilon", 1e-5)
        self.ln_1 = nn.LayerNorm(hidden_size, eps=eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden, attn_metadata: AttentionMetadata, kv_cache) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), attn_metadata, kv_cache)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        hidden_size = config["hidden_size"]
        self.wte = nn.Embedding(config["vocab_size"], hidden_size)
        self.wpe = LearnedPositionEmbedding(config.get("max_position_embeddings", 1024), hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config["num_hidden_layers"]))
        self.ln_f = nn.LayerNorm(hidden_size, eps=config.get("layer_norm_epsilon", 1e-5))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        if config.get("add_cross_attention"):
            raise UnsupportedArchitectureError(
                "GPT2LMHeadModel with add_cross_attention (an encoder-decoder) is not supported"
            )
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", True))
        with torch.device("meta"):  # shapes only: load_weights supplies the storage
            self.transformer = GPT2Model(config)
            self.lm_head = None
            if not self.tie_word_embeddings:
                self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)
        self.requires_grad_(False)

    def _parameter_name(self, name: str) -> str | None:
        if _SAVED_MASK.fullmatch(name) or (self.lm_head is None and name == "lm_head.weight"):
            return None
        return with_prefix(name, "transformer.")

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Bind HF-named tensors (with or without the "transformer." prefix) as parameters, zero-copy."""
        bind_checkpoint_tensors(self, weights, self._parameter_name)

    def forward(self, input_ids, positions, attn_metadata: AttentionMetadata, kv_caches) -> torch.Tensor:
        """input_ids [T], positions [T], one (k_cache, v_cache) per layer -> final-normed hidden [T, hidden]."""
        hidden = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block, kv_cache in zip(self.transformer.h, kv_caches, strict=True):
            hidden = block(hidden, attn_metadata, kv_cache)
        return self.transformer.ln_f(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, hidden] -> logits [R, vocab] float32."""
        weight = self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
