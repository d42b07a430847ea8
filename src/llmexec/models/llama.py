"""Llama for a flattened, paged batch: Llama 2/3, SmolLM2, Mistral without sliding window.

Module and parameter names mirror transformers' so checkpoint names map to
parameters one to one. Parameters start on the "meta" device (shapes only);
load_weights makes the checkpoint tensors themselves the parameters, without
copying, so many processes can share one shared-memory copy of the weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmexec.errors import CheckpointError, UnsupportedArchitectureError
from llmexec.models.attention import Attention, AttentionMetadata
from llmexec.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary, rope_settings

# Checkpoint entries that are not parameters and are safe to drop: old Llama checkpoints
# saved the rotary buffer, which is recomputed from the config.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class LlamaAttention(nn.Module):
    def __init__(self, config: Mapping, head_dim: int) -> None:
        super().__init__()
        hidden_size = config["hidden_size"]
        num_heads = config["num_attention_heads"]
        num_kv_heads = config.get("num_key_value_heads") or num_heads
        bias = bool(config.get("attention_bias", False))
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.attn = Attention(num_heads, num_kv_heads, head_dim, scale=head_dim**-0.5)

    def forward(self, hidden, cos, sin, attn_metadata: AttentionMetadata, kv_cache) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        query = self.q_proj(hidden).view(num_tokens, -1, self.head_dim)
        key = self.k_proj(hidden).view(num_tokens, -1, self.head_dim)
        value = self.v_proj(hidden)
        query = apply_rotary(query, cos, sin).flatten(1)
        key = apply_rotary(key, cos, sin).flatten(1)
        return self.o_proj(self.attn(query, key, value, attn_metadata, kv_cache))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Mapping, head_dim: int) -> None:
        super().__init__()
        eps = config.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(config, head_dim)
        self.mlp = GatedMLP(config["hidden_size"], config["intermediate_size"], bias=bool(config.get("mlp_bias", False)))
        self.input_layernorm = RMSNorm(config["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], eps)

    def forward(self, hidden, cos, sin, attn_metadata: AttentionMetadata, kv_cache) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, attn_metadata, kv_cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: Mapping, head_dim: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, head_dim) for _ in range(config["num_hidden_layers"]))
        self.norm = RMSNorm(config["hidden_size"], config.get("rms_norm_eps", 1e-6))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitectureError(f"hidden_act {config['hidden_act']!r} is not supported (only 'silu')")
        num_heads = config["num_attention_heads"]
        self.num_kv_heads = config.get("num_key_value_heads") or num_heads
        self.head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
        self.num_layers = config["num_hidden_layers"]
        self.vocab_size = config["vocab_size"]
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", False))
        with torch.device("meta"):  # shapes only: load_weights supplies the storage
            self.model = LlamaModel(config, self.head_dim)
            self.lm_head = None
            if not self.tie_word_embeddings:
                self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)
        theta, scaling = rope_settings(config)
        max_positions = config.get("max_position_embeddings", 2048)
        self.rotary_emb = RotaryEmbedding(self.head_dim, theta, scaling, max_positions)
        self.requires_grad_(False)

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Make the HF-named checkpoint tensors this module's parameters, sharing their storage.

        Strict: every parameter must be given with its exact shape, and nothing else
        (lm_head.weight is accepted and ignored when embeddings are tied). Raises
        CheckpointError naming the offending tensors.
        """
        params = dict(self.named_parameters())
        ignored = {name for name in weights if name.endswith(_IGNORED_SUFFIXES)}
        if self.tie_word_embeddings and "lm_head.weight" in weights:
            ignored.add("lm_head.weight")
            params_and_tied = {**params, "lm_head.weight": params["model.embed_tokens.weight"]}
        else:
            params_and_tied = params
        missing = sorted(params.keys() - weights.keys())
        unexpected = sorted(weights.keys() - params.keys() - ignored)
        if missing or unexpected:
            raise CheckpointError(f"checkpoint does not match LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
        for name, param in params_and_tied.items():
            if name in weights and tuple(weights[name].shape) != tuple(param.shape):
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(weights[name].shape)}, expected {tuple(param.shape)}"
                )
        dtype = weights["model.embed_tokens.weight"].dtype
        wrong_dtype = sorted(name for name in params if weights[name].dtype != dtype)
        if wrong_dtype:
            raise CheckpointError(f"tensors {wrong_dtype} are not {dtype} like model.embed_tokens.weight")

        for name in params:
            module_name, _, attr = name.rpartition(".")
            module = self.get_submodule(module_name)
            # nn.Parameter wraps the given tensor itself: same storage, no copy.
            module._parameters[attr] = nn.Parameter(weights[name], requires_grad=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids [T], positions [T], one (k_cache, v_cache) per layer -> final-normed hidden [T, hidden]."""
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden = layer(hidden, cos, sin, attn_metadata, kv_cache)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, hidden] -> logits [R, vocab] float32."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
