"""Runs one flattened step through the model and its paged KV cache, and samples.

The runner owns the model (built from the registry, its parameters the given
weight tensors) and the KV cache, one (k_cache, v_cache) pair per layer, each
[num_blocks, block_size, kv_heads, head_dim]. The scheduler owns which blocks
each sequence uses; the runner trusts the step only after validating it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from llmexec.errors import InvalidArgumentError
from llmexec.host_to_device import to_device
from llmexec.kernels.backend import uses_triton_on
from llmexec.models.attention import AttentionMetadata
from llmexec.models.config_keys import standard_config
from llmexec.models.parallel_layers import TensorParallelGroup, parallelize
from llmexec.models.registry import architecture_of, model_class_for
from llmexec.models.tensor_parallel import plan_for, rank_config
from llmexec.quantization.linear_swap import swap_quantized_linears
from llmexec.runner.cuda_graphs import DecodeGraphs
from llmexec.runner.gpu_memory import kv_cache_blocks, profile_activation_bytes
from llmexec.runner.sampled_tokens import CarriedTokens
from llmexec.runner.sampler import sample_on_device, token_logprobs
from llmexec.step import StepInput, StepOutput, TokenLogprobs


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


@dataclass
class GpuOptions:
    """How a runner on CUDA sizes its KV cache and which decode steps run as CUDA graphs."""

    gpu_memory_utilization: float = 0.9  # the device's use once the cache is allocated (gpu_memory)
    max_num_batched_tokens: int = 8192  # the largest step, profiled for activation memory
    cuda_graph_max_batch: int = 256  # 0: no CUDA graphs
    cuda_graph_max_seq_len: int = 8192  # longer contexts decode eagerly


class ModelRunner:
    def __init__(
        self,
        config: Mapping,
        weights: Mapping[str, torch.Tensor],
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
        kv_cache_dtype: torch.dtype | None = None,
        tensor_parallel: TensorParallelGroup | None = None,
        gpu: GpuOptions | None = None,
    ) -> None:
        """config: HF config dict; weights: HF-named tensors, used in place (not copied)
        when already on `device`. With `tensor_parallel`, weights are this rank's shard
        (llmexec.loader.tp_plan) and every rank must run the same steps.
        kv_cache_dtype: default float32 on CPU, the weights' dtype on CUDA. On CUDA,
        num_blocks 0 sizes the cache from free memory, and decode runs as CUDA graphs (gpu)."""
        started = time.perf_counter()
        self.startup_seconds: dict[str, float] = {}  # where the runner's start went, by phase
        if num_blocks < 0 or (num_blocks == 0 and torch.device(device).type != "cuda") or block_size <= 0:
            raise InvalidArgumentError(f"num_blocks and block_size must be > 0, got {num_blocks} and {block_size}")
        self.device = torch.device(device)
        self.block_size = block_size
        config = standard_config(config)
        model_class = model_class_for(architecture_of(config), config)
        self.vocab_size = config["vocab_size"]
        self.tensor_parallel = tensor_parallel
        if tensor_parallel is not None:  # this rank's heads and slices of the MLP and vocabulary
            tensor_parallel_plan = plan_for(model_class, config, tensor_parallel.size)
            config = rank_config(config, tensor_parallel.size)
        self.model = model_class(config)
        # Linears the loader quantized become quantized modules over the same tensors.
        weights = swap_quantized_linears(self.model, weights)
        if tensor_parallel is not None:
            parallelize(self.model, tensor_parallel_plan, tensor_parallel, self.vocab_size)
        self.model.load_weights(weights)
        self.model.to(self.device).eval()
        num_layers, num_kv_heads, head_dim = kv_cache_spec(config)
        # No options: eager decode (callers such as tests and tools); the runner service passes its flags.
        gpu = gpu or GpuOptions(cuda_graph_max_batch=0)
        self.startup_seconds["model"] = time.perf_counter() - started
        self.kv_cache_dtype = kv_cache_dtype = kv_cache_dtype or self._default_kv_cache_dtype()
        if num_blocks == 0:
            num_blocks = self._blocks_for_free_memory(gpu, (num_layers, num_kv_heads, head_dim))
            if tensor_parallel is not None:  # one block table serves every rank: the smallest cache fits all
                num_blocks = tensor_parallel.min_over_ranks(num_blocks)
        self.num_blocks = num_blocks
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
        self.startup_seconds["kv_cache"] = time.perf_counter() - started - sum(self.startup_seconds.values())
        self.decode_graphs = None
        if uses_triton_on(self.device) and gpu.cuda_graph_max_batch > 0:
            self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, block_size, gpu.cuda_graph_max_batch,
                                              gpu.cuda_graph_max_seq_len, self.device)
            self.decode_graphs.capture()
            self.startup_seconds["cuda_graphs"] = self.decode_graphs.capture_seconds

    def _default_kv_cache_dtype(self) -> torch.dtype:
        """float32 on CPU; on CUDA the dtype the model computes in (the Triton kernels read the
        cache in the query's dtype): its first floating parameter's (quantized codes are not)."""
        if self.device.type != "cuda":
            return torch.float32
        return next((p.dtype for p in self.model.parameters() if p.dtype.is_floating_point), torch.float32)

    def _blocks_for_free_memory(self, gpu: GpuOptions, spec: tuple[int, int, int]) -> int:
        num_layers, num_kv_heads, head_dim = spec
        shape = (num_layers, self.block_size, num_kv_heads, head_dim)
        activations = profile_activation_bytes(self.model, gpu.max_num_batched_tokens, shape, self.kv_cache_dtype,
                                               self.device, max(gpu.cuda_graph_max_batch, 256))
        bytes_per_block = 2 * num_layers * self.block_size * num_kv_heads * head_dim * self.kv_cache_dtype.itemsize
        return kv_cache_blocks(bytes_per_block, gpu.gpu_memory_utilization, activations, self.device)

    def execute(self, step: StepInput) -> list[int]:
        """Run the step; return one sampled token id per sequence with needs_sample, in order."""
        return self.execute_step(step).sampled_token_ids

    def execute_step(self, step: StepInput, histories: list[list[int] | None] | None = None) -> StepOutput:
        """Run the step and sample; histories (one per sampled sequence, see
        TokenHistories.update) feed the penalties. Logprobs where asked."""
        return self.sample_step(step, self.execute_logits(step), histories)

    def sample_step(self, step: StepInput, logits: torch.Tensor,
                    histories: list[list[int] | None] | None = None) -> StepOutput:
        """Sample from execute_logits' result and wait for the tokens."""
        return self.launch_sample(step, logits, histories).result()

    def launch_sample(self, step: StepInput, logits: torch.Tensor, histories: list[list[int] | None] | None = None,
                      history_tails: dict[int, torch.Tensor] | None = None) -> LaunchedStep:
        """Queue the sampling of execute_logits' result; the tokens stay on the device, and
        their copy to the host is queued (LaunchedStep.result waits for it). history_tails:
        see CarriedTokens.history_tails."""
        sampled = [s for s in step.sequences if s.needs_sample]
        params = [s.sampling_params for s in sampled]
        with torch.inference_mode():
            tokens = sample_on_device(logits, params, [s.output_index for s in sampled], histories,
                                      step.eos_token_ids, history_tails)
            logprobs: list[TokenLogprobs | None] = [None] * len(params)
            if any(p.logprobs is not None for p in params):  # needs the tokens on the host now
                logprobs = token_logprobs(logits, tokens.tolist(), params)
        return LaunchedStep(tokens, logprobs)

    def execute_logits(self, step: StepInput, carried: CarriedTokens | None = None) -> torch.Tensor:
        """Run the step; return logits [num sequences with needs_sample, vocab] float32.
        carried: input rows to take from an earlier step's tokens on the device (SampledTokens).

        On CUDA this returns once the work is queued, so the caller can do host work while
        the GPU runs (sample_step waits)."""
        self.validate(step)
        if self.decode_graphs is not None and self.decode_graphs.fits(step):
            logits = self.decode_graphs.run(step, carried)
            if all(s.needs_sample for s in step.sequences):
                return logits
            rows = [i for i, s in enumerate(step.sequences) if s.needs_sample]
            return logits[to_device(rows, self.device)]
        with torch.inference_mode():
            input_ids = to_device(step.input_ids, self.device)
            if carried is not None:
                input_ids[to_device(carried.rows, self.device)] = carried.values
            positions = to_device(step.positions, self.device)
            attn_metadata = AttentionMetadata.build(step, self.block_size, self.device)
            hidden = self.model(input_ids, positions, attn_metadata, self.kv_caches)
            last_rows, row = [], 0
            for seq in step.sequences:
                row += seq.query_len
                if seq.needs_sample:
                    last_rows.append(row - 1)
            return self.model.compute_logits(hidden[to_device(last_rows, self.device)])

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


class LaunchedStep:
    """A step's sampled tokens, queued on the device, with their copy to the host under way."""

    def __init__(self, tokens: torch.Tensor, logprobs: list[TokenLogprobs | None]) -> None:
        self.tokens = tokens  # on the device: a step that continues this one reads them there
        self.logprobs = logprobs
        self._ready: torch.cuda.Event | None = None
        if tokens.device.type == "cuda":
            self._host = tokens.to("cpu", non_blocking=True)  # pinned by torch: a real async copy
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tokens

    @property
    def waits(self) -> bool:
        """Whether result() blocks on the device."""
        return self._ready is not None and not self._ready.query()

    def result(self) -> StepOutput:
        if self._ready is not None:
            self._ready.synchronize()
        return StepOutput(sampled_token_ids=self._host.tolist(), logprobs=self.logprobs)
