"""Llama for a flattened, paged batch (Llama 2/3, CodeLlama, SmolLM2, Mistral), and the base of its family.

Qwen2, Qwen3, Phi-3 and Mixtral differ from it in one place each, so they
subclass it and override one hook: `LlamaAttention.projection_biases`,
`LlamaAttention.norm_query_key`, `LlamaForCausalLM.rotary_dim`, `LlamaForCausalLM.make_mlp`.

Module and parameter names mirror transformers', except that q/k/v and gate/up
are fused (`qkv_proj`, `gate_up_proj`, as in vLLM and Phi-3): the loader's
weight plan (llmexec.loader.weight_plan) builds those from the checkpoint's
separate tensors following `packed_modules_mapping`. Parameters start on the
"meta" device (shapes only); load_weights makes the given tensors themselves
the parameters, without copying, so many processes share one copy in shared memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from llmexec.errors import UnsupportedArchitectureError
from llmexec.kernels import backend
from llmexec.models.attention import Attention, AttentionMetadata
from llmexec.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, StepRotary, rope_inv_freq, rope_settings
from llmexec.models.tensor_parallel import ROW, VOCAB, ColumnSplit, Split
from llmexec.models.weight_binding import bind_checkpoint_tensors

# Checkpoint entries that are not parameters and are safe to drop: old Llama checkpoints
# saved the rotary buffer, which is recomputed from the config.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def layer_sliding_windows(config: Mapping) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as transformers reads the config.

    Mistral and Phi-3 window every layer when `sliding_window` is set; Qwen2/3 only
    with `use_sliding_window`, from layer `max_window_layers` on; configs with
    `layer_types` name each layer's kind.
    """
    num_layers = config["num_hidden_layers"]
    window = config.get("sliding_window")
    if not window or config.get("use_sliding_window") is False:
        return [None] * num_layers
    if config.get("layer_types"):
        return [window if kind == "sliding_attention" else None for kind in config["layer_types"]]
    first_windowed = config.get("max_window_layers", 0)
    return [window if i >= first_windowed else None for i in range(num_layers)]


class LlamaAttention(nn.Module):
    def __init__(self, config: Mapping, head_dim: int, sliding_window: int | None) -> None:
        super().__init__()
        hidden_size = config["hidden_size"]
        num_heads = config["num_attention_heads"]
        num_kv_heads = config.get("num_key_value_heads") or num_heads
        qkv_bias, o_bias = self.projection_biases(config)
        self.head_dim = head_dim
        self.qkv_sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        self.qkv_proj = nn.Linear(hidden_size, sum(self.qkv_sizes), bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        self.attn = Attention(num_heads, num_kv_heads, head_dim, scale=head_dim**-0.5, sliding_window=sliding_window)

    @staticmethod
    def projection_biases(config: Mapping) -> tuple[bool, bool]:
        """(q/k/v bias, o_proj bias)."""
        bias = bool(config.get("attention_bias", False))
        return bias, bias

    def norm_query_key(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [T, heads, head_dim], key [T, kv_heads, head_dim] before rotary; Llama leaves them as they are."""
        return query, key

    def forward(self, hidden, rotary: StepRotary, attn_metadata: AttentionMetadata, kv_cache) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        query, key, value = self.qkv_proj(hidden).split(self.qkv_sizes, dim=-1)
        query, key = self.norm_query_key(
            query.view(num_tokens, -1, self.head_dim), key.view(num_tokens, -1, self.head_dim)
        )
        query, key = rotary.apply(query, key)
        return self.o_proj(self.attn(query.flatten(1), key.flatten(1), value, attn_metadata, kv_cache))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, hidden, rotary: StepRotary, attn_metadata: AttentionMetadata, kv_cache) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rotary, attn_metadata, kv_cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def forward_fused(
        self, hidden, residual: torch.Tensor | None, rotary: StepRotary, attn_metadata: AttentionMetadata, kv_cache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same layer with each residual add fused into the RMSNorm after it (the CUDA path).

        hidden: the previous layer's MLP output, not yet added to `residual` (None before the
        first layer, where hidden is the embedding). Returns (this layer's MLP output, residual);
        the caller adds them, fused into the next norm. Same sums, same rounding as forward().
        """
        if residual is None:
            residual = hidden
            normed = self.input_layernorm(hidden)
        else:
            normed, residual = backend.fused_add_rms_norm(
                hidden, residual, self.input_layernorm.weight, self.input_layernorm.eps
            )
        attn_output = self.self_attn(normed, rotary, attn_metadata, kv_cache)
        norm = self.post_attention_layernorm
        normed, residual = backend.fused_add_rms_norm(attn_output, residual, norm.weight, norm.eps)
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Mapping, layers: list[LlamaDecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config["hidden_size"], config.get("rms_norm_eps", 1e-6))


class LlamaForCausalLM(nn.Module):
    # Fused parameter -> the checkpoint modules stacked in it, in row order (read by the loader).
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    attention_class = LlamaAttention

    def __init__(self, config: Mapping) -> None:
        super().__init__()
        self.check_config(config)
        num_heads = config["num_attention_heads"]
        self.num_kv_heads = config.get("num_key_value_heads") or num_heads
        self.head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
        self.num_layers = config["num_hidden_layers"]
        self.vocab_size = config["vocab_size"]
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", False))
        eps = config.get("rms_norm_eps", 1e-6)
        with torch.device("meta"):  # shapes only: load_weights supplies the storage
            layers = [
                LlamaDecoderLayer(
                    self.attention_class(config, self.head_dim, window),
                    self.make_mlp(config),
                    config["hidden_size"],
                    eps,
                )
                for window in layer_sliding_windows(config)
            ]
            self.model = LlamaModel(config, layers)
            self.lm_head = None
            if not self.tie_word_embeddings:
                self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)
        theta, scaling = rope_settings(config)
        max_positions = config.get("max_position_embeddings", 2048)
        self.rotary_emb = RotaryEmbedding(self.rotary_dim(config, self.head_dim), theta, scaling, max_positions)
        self.requires_grad_(False)

    @classmethod
    def check_config(cls, config: Mapping) -> None:
        """Raise UnsupportedArchitectureError for a config this class cannot run (cheap; the loader calls it)."""
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitectureError(f"hidden_act {config['hidden_act']!r} is not supported (only 'silu')")
        theta, scaling = rope_settings(config)
        rope_inv_freq(2, theta, scaling, config.get("max_position_embeddings", 2048))  # raises for unknown scaling

    @classmethod
    def tensor_parallel_plan(cls, config: Mapping) -> dict[str, Split]:
        """How the weights split across tensor-parallel ranks (llmexec.models.tensor_parallel); the rest is replicated."""
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        qkv_parts = ((heads, head_dim), (kv_heads, head_dim), (kv_heads, head_dim))  # each part split by heads
        return {
            "model.embed_tokens": VOCAB,
            "lm_head": VOCAB,
            "model.layers.*.self_attn.qkv_proj": ColumnSplit(qkv_parts),
            "model.layers.*.self_attn.o_proj": ROW,
            **cls.mlp_tensor_parallel_plan(config),
        }

    @classmethod
    def mlp_tensor_parallel_plan(cls, config: Mapping) -> dict[str, Split]:
        intermediate = config["intermediate_size"]
        return {"model.layers.*.mlp.gate_up_proj": ColumnSplit(((intermediate, 1), (intermediate, 1))),
                "model.layers.*.mlp.down_proj": ROW}

    def make_mlp(self, config: Mapping) -> nn.Module:
        return GatedMLP(config["hidden_size"], config["intermediate_size"], bias=bool(config.get("mlp_bias", False)))

    def rotary_dim(self, config: Mapping, head_dim: int) -> int:
        """How many leading dims of each head rotary rotates; Llama rotates them all."""
        return head_dim

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Make the given tensors (named as the loader's weight plan names them: HF names with
        q/k/v and gate/up fused) this module's parameters, sharing their storage.

        Strict: every parameter must be given with its exact shape and one dtype, and
        nothing else (lm_head.weight is accepted and ignored when embeddings are tied).
        Raises CheckpointError naming the offending tensors.
        """
        bind_checkpoint_tensors(self, weights, self._parameter_name)

    def _parameter_name(self, name: str) -> str | None:
        if name.endswith(_IGNORED_SUFFIXES) or (self.tie_word_embeddings and name == "lm_head.weight"):
            return None
        return name

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids [T], positions [T], one (k_cache, v_cache) per layer -> final-normed hidden [T, hidden]."""
        hidden = self.model.embed_tokens(input_ids)
        rotary = StepRotary(self.rotary_emb, positions, hidden.dtype)
        if backend.uses_triton(hidden):  # residual adds fused into the norms (Triton)
            residual = None
            for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
                hidden, residual = layer.forward_fused(hidden, residual, rotary, attn_metadata, kv_cache)
            norm = self.model.norm
            return backend.fused_add_rms_norm(hidden, residual, norm.weight, norm.eps)[0]
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden = layer(hidden, rotary, attn_metadata, kv_cache)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, hidden] -> logits [R, vocab] float32."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
