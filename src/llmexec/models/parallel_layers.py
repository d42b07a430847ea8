"""Running one rank of a tensor-parallel model: the process group and the few layers that talk through it.

A rank's model is the ordinary model class built from `rank_config` (its heads, its
slice of the MLP and vocabulary); `parallelize` then adds what makes the ranks one
model, keyed by the class's `tensor_parallel_plan`:
- each row-split layer (o_proj, down_proj, the experts) all-reduces its output, through a
  forward hook, so the model code and any fused path the runner takes stay as they are;
- the vocabulary-split embedding looks up the ids its rank holds and all-reduces;
- compute_logits gathers the ranks' vocabulary slices (only the rows that sample).

Collectives go through torch.distributed on `group.device_group` (NCCL on GPUs,
gloo on CPU); nothing here is transport of our own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmexec.models.tensor_parallel import RowSplit, Split, VocabSplit, split_of


@dataclass
class TensorParallelGroup:
    """This process's place among the ranks, and the groups collectives run on.

    device_group carries tensors (NCCL or gloo); control_group (gloo, CPU) carries the
    step that rank 0 hands the other ranks. `timings`, when a list, collects
    (start, end) CUDA events or perf_counter pairs around each collective.
    """

    rank: int
    size: int
    device_group: dist.ProcessGroup | None = None
    control_group: dist.ProcessGroup | None = None
    timings: list | None = field(default=None, repr=False)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns `tensor`."""
        with self._timed(tensor):
            dist.all_reduce(tensor, group=self.device_group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank 0's columns first."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        with self._timed(tensor):
            dist.all_gather(parts, tensor.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=-1)

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value` (through the CPU control group)."""
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(tensor.item())

    def _timed(self, tensor: torch.Tensor):
        return _Timed(self.timings, tensor.device) if self.timings is not None else _NOT_TIMED


class _NotTimed:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


_NOT_TIMED = _NotTimed()


class _Timed:
    """Records the collective's span: CUDA events on a GPU (no synchronisation), wall time on CPU."""

    def __init__(self, timings: list, device: torch.device) -> None:
        self.timings, self.cuda = timings, device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()
        return self

    def __exit__(self, *exc_info):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self.timings.append((self.start, end))
        return False


def collective_seconds(timings: list) -> float:
    """Total seconds of the recorded collectives (synchronises CUDA first)."""
    if timings and isinstance(timings[0][0], torch.cuda.Event):
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in timings) / 1e3
    return sum(end - start for start, end in timings)


class VocabParallelEmbedding(nn.Embedding):
    """An embedding holding rows [rank * n, (rank + 1) * n) of the vocabulary: ids elsewhere
    look up zeros, and the all-reduce sums the one rank that holds each id."""

    def __init__(self, num_local_rows: int, embedding_dim: int, group: TensorParallelGroup, **kwargs) -> None:
        super().__init__(num_local_rows, embedding_dim, **kwargs)
        self.group = group
        self.first_row = group.rank * num_local_rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local_ids = input_ids - self.first_row
        elsewhere = (local_ids < 0) | (local_ids >= self.num_embeddings)
        hidden = F.embedding(local_ids.masked_fill(elsewhere, 0), self.weight)
        return self.group.all_reduce(hidden.masked_fill(elsewhere[:, None], 0))


def parallelize(model: nn.Module, plan: Mapping[str, Split], group: TensorParallelGroup, vocab_size: int) -> None:
    """Make `model` (built from rank_config, weights not yet bound) one rank of the whole.

    Call after swapping quantized linears (hooks live on the modules that run) and
    before load_weights (the embedding is replaced on "meta"). compute_logits then
    returns [rows, vocab_size] on every rank.
    """
    hooked: set[str] = set()
    for name, module in list(model.named_modules()):
        split, _ = split_of(plan, f"{name}.weight")
        if isinstance(split, VocabSplit) and type(module) is nn.Embedding:
            parallel = VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, group, device="meta")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, parallel)
        elif isinstance(split, RowSplit):
            hooked.add(name)
    # A plan may name a parameter (stacked experts' down_proj): the module owning it reduces.
    for name, _ in model.named_parameters():
        split, suffix = split_of(plan, name)
        if isinstance(split, RowSplit) and suffix == "":
            hooked.add(name.rpartition(".")[0])
    for name in hooked:
        model.get_submodule(name).register_forward_hook(lambda module, args, output: group.all_reduce(output))

    local_logits = model.compute_logits

    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, hidden] -> logits [R, vocab] float32, the ranks' slices gathered, padding dropped."""
        return group.all_gather_last_dim(local_logits(hidden))[:, :vocab_size]

    model.compute_logits = compute_logits
