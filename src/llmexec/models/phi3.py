"""Phi-3: Llama whose checkpoint already fuses qkv_proj and gate_up_proj, with optional partial rotary.

The fused checkpoint tensors carry exactly our parameter names, so the loader's
weight plan passes them through. Sliding window (Phi-3-mini-4k: 2047) comes
from the config like Mistral's. LongRoPE scaling (the 128k variants) is not
supported: the model refuses it at load.
"""

from __future__ import annotations

from collections.abc import Mapping

from llmexec.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def rotary_dim(self, config: Mapping, head_dim: int) -> int:
        rope_parameters = config.get("rope_parameters") or {}
        factor = rope_parameters.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        return int(head_dim * factor)
