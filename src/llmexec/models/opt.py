"""OPT for a flattened, paged batch: learned positions offset by 2, ReLU, optional projections.

OPT-350m embeds in a smaller word_embed_proj_dim and projects in and out of hidden_size,
and normalizes after each sublayer (do_layer_norm_before=False); the other sizes
normalize before. Module and parameter names mirror transformers' OPTForCausalLM.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmexec.models.activations import activation
from llmexec.models.attention import Attention, AttentionMetadata
from llmexec.models.positional import LearnedPositionEmbedding
from llmexec.models.weight_binding import bind_checkpoint_tensors, with_prefix

# OPT's position table reserves its first 2 rows: position p reads row p + 2.
POSITION_OFFSET = 2


def _layer_norm(config: Mapping) -> nn.LayerNorm:
    return nn.LayerNorm(config["hidden_size"], elementwise_affine=config.get("layer_norm_elementwise_affine", True))


class OPTAttention(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        hidden_size, num_heads = config["hidden_size"], config["num_attention_heads"]
        head_dim = hidden_size // num_heads
        bias = bool(config.get("enable_bias", True))
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.attn = Attention(num_heads, num_heads, head_dim, scale=head_dim**-0.5)

    def forward(self, hidden, attn_metadata: AttentionMetadata, kv_cache) -> torch.Tensor:
        query, key, value = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        return self.out_proj(self.attn(query, key, value, attn_metadata, kv_cache))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        bias = bool(config.get("enable_bias", True))
        self.do_layer_norm_before = bool(config.get("do_layer_norm_before", True))
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = _layer_norm(config)
        self.fc1 = nn.Linear(config["hidden_size"], config["ffn_dim"], bias=bias)
        self.fc2 = nn.Linear(config["ffn_dim"], config["hidden_size"], bias=bias)
        self.final_layer_norm = _layer_norm(config)
        self.act = activation(config.get("activation_function", "relu"))

    def forward(self, hidden, attn_metadata: AttentionMetadata, kv_cache) -> torch.Tensor:
        pre_norm = self.do_layer_norm_before
        attn_input = self.self_attn_layer_norm(hidden) if pre_norm else hidden
        hidden = hidden + self.self_attn(attn_input, attn_metadata, kv_cache)
        if not pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        mlp_input = self.final_layer_norm(hidden) if pre_norm else hidden
        hidden = hidden + self.fc2(self.act(self.fc1(mlp_input)))
        return hidden if pre_norm else self.final_layer_norm(hidden)


class OPTDecoder(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        hidden_size = config["hidden_size"]
        embed_dim = config.get("word_embed_proj_dim") or hidden_size
        self.embed_tokens = nn.Embedding(config["vocab_size"], embed_dim)
        self.embed_positions = LearnedPositionEmbedding(
            config["max_position_embeddings"] + POSITION_OFFSET, hidden_size, offset=POSITION_OFFSET
        )
        self.project_in = self.project_out = None
        if embed_dim != hidden_size:
            self.project_in = nn.Linear(embed_dim, hidden_size, bias=False)
            self.project_out = nn.Linear(hidden_size, embed_dim, bias=False)
        # Post-norm models (OPT-350m) have no final norm; _remove_final_layer_norm is a
        # transformers backward-compatibility switch for checkpoints without it.
        self.final_layer_norm = None
        if config.get("do_layer_norm_before", True) and not config.get("_remove_final_layer_norm", False):
            self.final_layer_norm = _layer_norm(config)
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config["num_hidden_layers"]))


class OPTModel(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    def __init__(self, config: Mapping) -> None:
        super().__init__()
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", True))
        with torch.device("meta"):  # shapes only: load_weights supplies the storage
            self.model = OPTModel(config)
            self.lm_head = None
            if not self.tie_word_embeddings:
                embed_dim = config.get("word_embed_proj_dim") or config["hidden_size"]
                self.lm_head = nn.Linear(embed_dim, config["vocab_size"], bias=False)
        self.requires_grad_(False)

    def _parameter_name(self, name: str) -> str | None:
        if self.lm_head is None and name == "lm_head.weight":
            return None
        # facebook/opt-* checkpoints name the base model "decoder.*", without "model.".
        return with_prefix(name, "model.")

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Bind HF-named tensors (with or without the "model." prefix) as parameters, zero-copy."""
        bind_checkpoint_tensors(self, weights, self._parameter_name)

    def forward(self, input_ids, positions, attn_metadata: AttentionMetadata, kv_caches) -> torch.Tensor:
        """input_ids [T], positions [T], one (k_cache, v_cache) per layer -> hidden [T, word_embed_proj_dim]."""
        decoder = self.model.decoder
        hidden = decoder.embed_tokens(input_ids)
        if decoder.project_in is not None:
            hidden = decoder.project_in(hidden)
        hidden = hidden + decoder.embed_positions(positions)
        for layer, kv_cache in zip(decoder.layers, kv_caches, strict=True):
            hidden = layer(hidden, attn_metadata, kv_cache)
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, word_embed_proj_dim] -> logits [R, vocab] float32."""
        weight = self.model.decoder.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
