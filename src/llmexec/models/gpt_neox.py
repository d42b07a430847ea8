"""GPT-NeoX / Pythia for a flattened, paged batch: partial rotary, parallel residual, fused q/k/v.

query_key_value's output is laid out per head ([heads, 3, head_dim]), so it is viewed that
way rather than reordering the weight. Module and parameter names mirror transformers',
except the head, which keeps the checkpoint's name `embed_out` (transformers >= 5 calls it
lm_head in memory; both names load).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmexec.models.activations import activation
from llmexec.models.attention import Attention, AttentionMetadata
from llmexec.models.layers import RotaryEmbedding, apply_partial_rotary, rope_settings
from llmexec.models.tensor_parallel import ROW, VOCAB, ColumnSplit, Split
from llmexec.models.weight_binding import bind_checkpoint_tensors

# Buffers older checkpoints saved: causal masks and the rotary table, all recomputed here.
_SAVED_BUFFER = re.compile(r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)")


def rotary_settings(config: Mapping, head_dim: int) -> tuple[int, float, dict | None]:
    """(rotary_dim, theta, scaling) from a NeoX config: transformers >= 5 writes rope_parameters
    with partial_rotary_factor; older files have rotary_pct and rotary_emb_base."""
    theta, scaling = rope_settings(config)
    params = config.get("rope_parameters") or {}
    if "rope_theta" not in params and "rope_theta" not in config:
        theta = float(config.get("rotary_emb_base", 10000.0))
    factor = params.get("partial_rotary_factor", config.get("rotary_pct", 0.25))  # 0.25: transformers' default
    if scaling is not None:  # a scaled rope_parameters dict also carries the factor: not a scaling setting
        scaling = {key: value for key, value in scaling.items() if key != "partial_rotary_factor"}
    return int(head_dim * factor), theta, scaling


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        hidden_size, num_heads = config["hidden_size"], config["num_attention_heads"]
        # head_dim in the config: a tensor-parallel rank's config has fewer heads, same head_dim.
        self.num_heads, self.head_dim = num_heads, config.get("head_dim") or hidden_size // num_heads
        bias = bool(config.get("attention_bias", True))
        self.query_key_value = nn.Linear(hidden_size, 3 * num_heads * self.head_dim, bias=bias)
        self.dense = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias)
        self.attn = Attention(num_heads, num_heads, self.head_dim, scale=self.head_dim**-0.5)

    def forward(self, hidden, cos, sin, attn_metadata: AttentionMetadata, kv_cache) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.query_key_value(hidden).view(num_tokens, self.num_heads, 3, self.head_dim)
        query = apply_partial_rotary(qkv[:, :, 0], cos, sin).flatten(1)
        key = apply_partial_rotary(qkv[:, :, 1], cos, sin).flatten(1)
        value = qkv[:, :, 2].reshape(num_tokens, -1)  # strided view -> the [T, hidden] rows attention expects
        return self.dense(self.attn(query, key, value, attn_metadata, kv_cache))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config["hidden_size"], config["intermediate_size"])
        self.dense_4h_to_h = nn.Linear(config["intermediate_size"], config["hidden_size"])
        self.act = activation(config.get("hidden_act", "gelu"))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(hidden)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        hidden_size, eps = config["hidden_size"], config.get("layer_norm_eps", 1e-5)
        self.use_parallel_residual = bool(config.get("use_parallel_residual", True))
        self.input_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.attention = GPTNeoXAttention(config)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, hidden, cos, sin, attn_metadata: AttentionMetadata, kv_cache) -> torch.Tensor:
        attn_output = self.attention(self.input_layernorm(hidden), cos, sin, attn_metadata, kv_cache)
        if self.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return hidden + attn_output + self.mlp(self.post_attention_layernorm(hidden))
        hidden = hidden + attn_output
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class GPTNeoXModel(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.layers = nn.ModuleList(GPTNeoXLayer(config) for _ in range(config["num_hidden_layers"]))
        self.final_layer_norm = nn.LayerNorm(config["hidden_size"], eps=config.get("layer_norm_eps", 1e-5))


class GPTNeoXForCausalLM(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", False))
        with torch.device("meta"):  # shapes only: load_weights supplies the storage
            self.gpt_neox = GPTNeoXModel(config)
            self.embed_out = None
            if not self.tie_word_embeddings:
                self.embed_out = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)
        rotary_dim, theta, scaling = rotary_settings(config, head_dim)
        max_positions = config.get("max_position_embeddings", 2048)
        self.rotary_emb = RotaryEmbedding(rotary_dim, theta, scaling, max_positions)
        self.requires_grad_(False)

    @classmethod
    def tensor_parallel_plan(cls, config: Mapping) -> dict[str, Split]:
        """How the weights split across tensor-parallel ranks (llmexec.models.tensor_parallel).

        query_key_value's rows are [heads, 3, head_dim]: one part of `heads` units of 3 * head_dim rows.
        """
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return {
            "gpt_neox.embed_in": VOCAB,
            "embed_out": VOCAB,
            "lm_head": VOCAB,  # the head's name in transformers >= 5 checkpoints
            "gpt_neox.layers.*.attention.query_key_value": ColumnSplit(((heads, 3 * head_dim),)),
            "gpt_neox.layers.*.attention.dense": ROW,
            "gpt_neox.layers.*.mlp.dense_h_to_4h": ColumnSplit(((config["intermediate_size"], 1),)),
            "gpt_neox.layers.*.mlp.dense_4h_to_h": ROW,
        }

    def _parameter_name(self, name: str) -> str | None:
        if _SAVED_BUFFER.fullmatch(name):
            return None
        if name in ("lm_head.weight", "embed_out.weight"):
            return None if self.embed_out is None else "embed_out.weight"
        return name

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Bind HF-named tensors as parameters, zero-copy; the head may be embed_out or lm_head."""
        bind_checkpoint_tensors(self, weights, self._parameter_name)

    def forward(self, input_ids, positions, attn_metadata: AttentionMetadata, kv_caches) -> torch.Tensor:
        """input_ids [T], positions [T], one (k_cache, v_cache) per layer -> final-normed hidden [T, hidden]."""
        hidden = self.gpt_neox.embed_in(input_ids)
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        for layer, kv_cache in zip(self.gpt_neox.layers, kv_caches, strict=True):
            hidden = layer(hidden, cos, sin, attn_metadata, kv_cache)
        return self.gpt_neox.final_layer_norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, hidden] -> logits [R, vocab] float32."""
        weight = self.gpt_neox.embed_in.weight if self.embed_out is None else self.embed_out.weight
        return F.linear(hidden, weight).float()
