"""BLOOM for a flattened, paged batch: ALiBi instead of positions, embedding layer norm, fused q/k/v.

query_key_value's output is laid out per head ([heads, 3, head_dim]) and viewed that way.
Module and parameter names mirror transformers' BloomForCausalLM; bigscience's own
checkpoints store the base model without the "transformer." prefix, which is accepted.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmexec.models.attention import Attention, AttentionMetadata
from llmexec.models.positional import alibi_slopes
from llmexec.models.weight_binding import bind_checkpoint_tensors, with_prefix


def _layer_norm(config: Mapping) -> nn.LayerNorm:
    return nn.LayerNorm(config["hidden_size"], eps=config.get("layer_norm_epsilon", 1e-5))


class BloomAttention(nn.Module):
    def __init__(self, config: Mapping, slopes: torch.Tensor) -> None:
        super().__init__()
        hidden_size, num_heads = config["hidden_size"], config["num_attention_heads"]
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.query_key_value = nn.Linear(hidden_size, 3 * hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.attn = Attention(num_heads, num_heads, self.head_dim, scale=self.head_dim**-0.5, alibi_slopes=slopes)

    def forward(self, hidden, attn_metadata: AttentionMetadata, kv_cache) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.query_key_value(hidden).view(num_tokens, self.num_heads, 3, self.head_dim)
        # Strided views -> the [T, hidden] rows attention expects (copies activations, never weights).
        query, key, value = (qkv[:, :, i].reshape(num_tokens, -1) for i in range(3))
        return self.dense(self.attn(query, key, value, attn_metadata, kv_cache))


class BloomMLP(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        hidden_size = config["hidden_size"]
        self.dense_h_to_4h = nn.Linear(hidden_size, 4 * hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # BLOOM's gelu is the tanh approximation.
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden), approximate="tanh"))


class BloomBlock(nn.Module):
    def __init__(self, config: Mapping, slopes: torch.Tensor) -> None:
        super().__init__()
        self.input_layernorm = _layer_norm(config)
        self.self_attention = BloomAttention(config, slopes)
        self.post_attention_layernorm = _layer_norm(config)
        self.mlp = BloomMLP(config)
        # Some BLOOM variants take the residual after the norm rather than before it.
        self.residual_after_norm = bool(config.get("apply_residual_connection_post_layernorm", False))

    def forward(self, hidden, attn_metadata: AttentionMetadata, kv_cache) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        residual = normed if self.residual_after_norm else hidden
        hidden = residual + self.self_attention(normed, attn_metadata, kv_cache)
        normed = self.post_attention_layernorm(hidden)
        residual = normed if self.residual_after_norm else hidden
        return residual + self.mlp(normed)


class BloomModel(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.word_embeddings_layernorm = _layer_norm(config)
        # One slopes tensor, shared by every layer's attention.
        slopes = alibi_slopes(config["num_attention_heads"])
        self.h = nn.ModuleList(BloomBlock(config, slopes) for _ in range(config["num_hidden_layers"]))
        self.ln_f = _layer_norm(config)


class BloomForCausalLM(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", True))
        with torch.device("meta"):  # shapes only: load_weights supplies the storage (the slopes are CPU tensors)
            self.transformer = BloomModel(config)
            self.lm_head = None
            if not self.tie_word_embeddings:
                self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)
        self.requires_grad_(False)

    def _parameter_name(self, name: str) -> str | None:
        if self.lm_head is None and name == "lm_head.weight":
            return None
        return with_prefix(name, "transformer.")

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Bind HF-named tensors (with or without the "transformer." prefix) as parameters, zero-copy."""
        bind_checkpoint_tensors(self, weights, self._parameter_name)

    def forward(self, input_ids, positions, attn_metadata: AttentionMetadata, kv_caches) -> torch.Tensor:
        """input_ids [T], positions [T] (unused: ALiBi reads positions from the metadata), one
        (k_cache, v_cache) per layer -> final-normed hidden [T, hidden]."""
        hidden = self.transformer.word_embeddings_layernorm(self.transformer.word_embeddings(input_ids))
        for block, kv_cache in zip(self.transformer.h, kv_caches, strict=True):
            hidden = block(hidden, attn_metadata, kv_cache)
        return self.transformer.ln_f(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, hidden] -> logits [R, vocab] float32."""
        weight = self.transformer.word_embeddings.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
