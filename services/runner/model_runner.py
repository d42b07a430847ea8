"""Runs one flattened step through the model and its paged KV cache, and samples.

The runner owns the model (built from the registry, its parameters the given
weight tensors) and the KV cache, one (k_cache, v_cache) pair per layer, each
[num_blocks, block_size, kv_heads, head_dim]. The scheduler owns which blocks
each sequence uses; the runner trusts the step only after validating it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llmexec.errors import InvalidArgumentError
from llmexec.models.attention import AttentionMetadata
from llmexec.models.config_keys import standard_config
from llmexec.models.registry import architecture_of, model_class_for
from llmexec.quantization.linear_swap import swap_quantized_linears
from llmexec.runner.sampler import sample, token_logprobs
from llmexec.step import StepInput, StepOutput


def kv_cache_spec(config: Mapping) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of an HF config dict."""
    config = standard_config(config)  # GPT-2 and BLOOM say n_layer, n_head, ...
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    return config["num_hidden_layers"], config.get("num_key_value_heads") or num_heads, head_dim


def num_blocks_for_memory(config: Mapping, block_size: int, num_bytes: int, dtype: torch.dtype) -> int:
    """How many KV-cache blocks (K and V, all layers) fit in num_bytes."""
    num_layers, num_kv_heads, head_dim = kv_cache_spec(config)
    bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize
    return num_bytes // bytes_per_block


class ModelRunner:
    def __init__(
        self,
        config: Mapping,
        weights: Mapping[str, torch.Tensor],
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
        kv_cache_dtype: torch.dtype = torch.float32,
    ) -> None:
        """config: HF config dict; weights: HF-named tensors, used in place (not copied)
        when already on `device`."""
        if num_blocks <= 0 or block_size <= 0:
            raise InvalidArgumentError(f"num_blocks and block_size must be > 0, got {num_blocks} and {block_size}")
        self.device = torch.device(device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_cache_dtype = kv_cache_dtype
        config = standard_config(config)
        model_class = model_class_for(architecture_of(config), config)
        self.model = model_class(config)
        # Linears the loader quantized become quantized modules over the same tensors.
        self.model.load_weights(swap_quantized_linears(self.model, weights))
        self.model.to(self.device).eval()
        self.vocab_size = config["vocab_size"]
        num_layers, num_kv_heads, head_dim = kv_cache_spec(config)
        # Zeroed, not empty: padded decode positions are masked out, but 0 * NaN from
        # uninitialised memory would still poison the weighted sum.
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=kv_cache_dtype, device=self.device),
                torch.zeros(shape, dtype=kv_cache_dtype, device=self.device),
            )
            for _ in range(num_layers)
        ]

    def execute(self, step: StepInput) -> list[int]:
        """Run the step; return one sampled token id per sequence with needs_sample, in order."""
        return self.execute_step(step).sampled_token_ids

    def execute_step(self, step: StepInput, histories: list[list[int] | None] | None = None) -> StepOutput:
        """Run the step and sample; histories (one per sampled sequence, see
        TokenHistories.update) feed the penalties. Logprobs where asked."""
        logits = self.execute_logits(step)
        sampled = [s for s in step.sequences if s.needs_sample]
        params = [s.sampling_params for s in sampled]
        with torch.inference_mode():
            token_ids = sample(logits, params, [s.output_index for s in sampled], histories, step.eos_token_ids)
            return StepOutput(sampled_token_ids=token_ids, logprobs=token_logprobs(logits, token_ids, params))

    def execute_logits(self, step: StepInput) -> torch.Tensor:
        """Run the step; return logits [num sequences with needs_sample, vocab] float32."""
        self.validate(step)
        with torch.inference_mode():
            input_ids = torch.tensor(step.input_ids, dtype=torch.int64, device=self.device)
            positions = torch.tensor(step.positions, dtype=torch.int64, device=self.device)
            attn_metadata = AttentionMetadata.build(step, self.block_size, self.device)
            hidden = self.model(input_ids, positions, attn_metadata, self.kv_caches)
            last_rows, row = [], 0
            for seq in step.sequences:
                row += seq.query_len
                if seq.needs_sample:
                    last_rows.append(row - 1)
            return self.model.compute_logits(hidden[torch.tensor(last_rows, dtype=torch.int64, device=self.device)])

    def validate(self, step: StepInput) -> None:
        """Cheap consistency checks; raises InvalidArgumentError naming the first problem."""
        if not step.sequences:
            raise InvalidArgumentError("step has no sequences")
        num_tokens = step.num_tokens
        if not len(step.positions) == len(step.slot_mapping) == num_tokens:
            raise InvalidArgumentError(
                f"step has {num_tokens} input_ids, {len(step.positions)} positions, {len(step.slot_mapping)} slots"
            )
        total_query = sum(s.query_len for s in step.sequences)
        if total_query != num_tokens:
            raise InvalidArgumentError(f"sequences' query_len sum to {total_query} but the step has {num_tokens} tokens")
        if min(step.input_ids) < 0 or max(step.input_ids) >= self.vocab_size:
            raise InvalidArgumentError(f"token ids must lie in [0, {self.vocab_size})")
        if min(step.positions) < 0:
            raise InvalidArgumentError("positions must be >= 0")
        num_slots = self.num_blocks * self.block_size
        if max(step.slot_mapping) >= num_slots:
            raise InvalidArgumentError(f"slot {max(step.slot_mapping)} is out of range (cache has {num_slots} slots)")
        for i, seq in enumerate(step.sequences):
            if not 1 <= seq.query_len <= seq.seq_len:
                raise InvalidArgumentError(
                    f"sequence {i}: need 1 <= query_len <= seq_len, got {seq.query_len} and {seq.seq_len}"
                )
            if len(seq.block_table) * self.block_size < seq.seq_len:
                raise InvalidArgumentError(
                    f"sequence {i}: block_table has {len(seq.block_table)} blocks of {self.block_size}, "
                    f"too few for seq_len {seq.seq_len}"
                )
            if seq.block_table and (min(seq.block_table) < 0 or max(seq.block_table) >= self.num_blocks):
                raise InvalidArgumentError(f"sequence {i}: block ids must lie in [0, {self.num_blocks})")
