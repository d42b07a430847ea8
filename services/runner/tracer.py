"""Trace one prefill and one decode step through every module of the model.

Hooks on each nn.Module record, in execution order, the module's name and
class, the shapes and dtypes of its tensor inputs and outputs, and its wall
time with and without its children. The step runs in a scratch KV cache sized
for the prompt, so tracing never touches blocks the scheduler has handed out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from llmexec.errors import InvalidArgumentError
from llmexec.models.attention import AttentionMetadata
from llmexec.runner.model_runner import ModelRunner
from llmexec.sampling_params import SamplingParams
from llmexec.step import SequenceInput, StepInput

GREEDY = SamplingParams(temperature=0.0, max_tokens=1)


@dataclass
class TensorDesc:
    shape: tuple[int, ...]
    dtype: str


@dataclass
class CallRecord:
    index: int
    name: str
    class_name: str
    depth: int
    inputs: list[TensorDesc]
    outputs: list[TensorDesc] = field(default_factory=list)
    seconds: float = 0.0
    self_seconds: float = 0.0


@dataclass
class StageTrace:
    stage: str
    num_tokens: int
    calls: list[CallRecord]
    sampled_token_id: int


def describe(value, limit: int = 4) -> list[TensorDesc]:
    """Tensors in value (a tensor, or a short tuple/list of them); long lists such as the KV caches are skipped."""
    if isinstance(value, torch.Tensor):
        return [TensorDesc(tuple(value.shape), str(value.dtype).removeprefix("torch."))]
    if isinstance(value, (tuple, list)) and len(value) <= limit:
        return [d for v in value for d in describe(v, limit)]
    return []


class ModuleTracer:
    """Context manager that records every module call of `model` while active."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[CallRecord] = []
        self._stack: list[tuple[CallRecord, float, float]] = []  # (record, start, children seconds)
        self._handles = []

    def __enter__(self) -> ModuleTracer:
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            inputs = [d for a in (*args, *kwargs.values()) for d in describe(a)]
            record = CallRecord(len(self.calls), name, type(module).__name__, len(self._stack), inputs)
            self.calls.append(record)
            self._stack.append((record, time.perf_counter(), 0.0))

        return hook

    def _post(self, module, args, kwargs, output):
        record, start, children = self._stack.pop()
        record.seconds = time.perf_counter() - start
        record.self_seconds = max(record.seconds - children, 0.0)
        record.outputs = describe(output)
        if self._stack:
            parent, parent_start, parent_children = self._stack[-1]
            self._stack[-1] = (parent, parent_start, parent_children + record.seconds)


def _run_traced(runner: ModelRunner, step: StepInput, kv_caches) -> tuple[list[CallRecord], int]:
    device = runner.device
    with torch.inference_mode(), ModuleTracer(runner.model) as tracer:
        input_ids = torch.tensor(step.input_ids, dtype=torch.int64, device=device)
        positions = torch.tensor(step.positions, dtype=torch.int64, device=device)
        metadata = AttentionMetadata.build(step, runner.block_size, device)
        hidden = runner.model(input_ids, positions, metadata, kv_caches)
        logits = runner.model.compute_logits(hidden[-1:])
    return tracer.calls, int(logits[0].argmax())


def trace_prefill_and_decode(runner: ModelRunner, prompt_token_ids: list[int]) -> list[StageTrace]:
    """Run the prompt's prefill, then one greedy decode step, with every module traced."""
    block_size = runner.block_size
    total = len(prompt_token_ids) + 1
    capacity = runner.num_blocks * block_size
    if not prompt_token_ids:
        raise InvalidArgumentError("trace needs a non-empty prompt")
    if total > capacity:
        raise InvalidArgumentError(f"a traced prompt may have at most {capacity - 1} tokens, got {total - 1}")
    bad = [t for t in prompt_token_ids if not 0 <= t < runner.vocab_size]
    if bad:
        raise InvalidArgumentError(f"prompt token ids {bad[:5]} lie outside the vocabulary [0, {runner.vocab_size})")
    num_blocks = -(-total // block_size)
    kv_caches = [
        (k.new_zeros((num_blocks, *k.shape[1:])), v.new_zeros((num_blocks, *v.shape[1:]))) for k, v in runner.kv_caches
    ]
    block_table = list(range(num_blocks))
    n = len(prompt_token_ids)
    prefill = StepInput(
        input_ids=list(prompt_token_ids),
        positions=list(range(n)),
        slot_mapping=list(range(n)),
        sequences=[SequenceInput(n, n, block_table, True, GREEDY, 0)],
    )
    prefill_calls, first = _run_traced(runner, prefill, kv_caches)
    decode = StepInput(
        input_ids=[first], positions=[n], slot_mapping=[n], sequences=[SequenceInput(1, n + 1, block_table, True, GREEDY, 1)]
    )
    decode_calls, second = _run_traced(runner, decode, kv_caches)
    return [StageTrace("prefill", n, prefill_calls, first), StageTrace("decode", 1, decode_calls, second)]
