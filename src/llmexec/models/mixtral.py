"""Mixtral: Mistral whose MLP is a sparse mixture of experts (top-2 of 8 per token in Mixtral 8x7B).

Checkpoints keep each expert's w1 (gate), w3 (up) and w2 (down) apart under
`block_sparse_moe`; the loader's weight plan stacks them into two tensors per
layer under `mlp.experts` (transformers' in-memory names), so a state dict of
transformers' own model passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import nn

from llmexec.models.llama import LlamaForCausalLM
from llmexec.models.moe import SparseMoE, StackedExperts
from llmexec.models.tensor_parallel import ROW, ColumnSplit, Split


class MixtralForCausalLM(LlamaForCausalLM):
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    renamed_modules: ClassVar[dict[str, str]] = {"block_sparse_moe.gate": "mlp.gate"}
    stacked_experts = StackedExperts(
        checkpoint_module="block_sparse_moe.experts",
        model_module="mlp.experts",
        params={"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)},
        num_experts_key="num_local_experts",
    )

    @classmethod
    def mlp_tensor_parallel_plan(cls, config: Mapping) -> dict[str, Split]:
        # Every expert is split by its intermediate dim (not experts by rank): each rank runs
        # every routed expert on its slice, so the load stays even whatever the router picks.
        intermediate = config["intermediate_size"]
        return {
            "model.layers.*.mlp.experts.gate_up_proj": ColumnSplit(((intermediate, 1), (intermediate, 1)), dim=1),
            "model.layers.*.mlp.experts.down_proj": ROW,
        }

    def make_mlp(self, config: Mapping) -> nn.Module:
        return SparseMoE(
            config["hidden_size"],
            config["intermediate_size"],
            config["num_local_experts"],
            config["num_experts_per_tok"],
        )
