"""What the model's parameters are made of: a pure description between the checkpoint and the shm store.

Checkpoints keep q/k/v, gate/up and each MoE expert in separate tensors; our
models run fused projections (one matmul instead of three) and stacked
experts. The runner never copies weights, so the fusing happens once, where the
loader writes shared memory: `plan_weights` says, for every model parameter,
which checkpoint tensors fill which slice of it. SharedWeights.create lays out
and fills the plan's targets while streaming; `materialize` does the same in
process for tests that hand a state dict to ModelRunner.

A model class declares what it fuses (all optional; without them every
checkpoint tensor is a parameter of the same name):
- `packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}`:
  `<prefix>.q_proj.<param>` fills rows of `<prefix>.qkv_proj.<param>`, in list order.
- `renamed_modules = {"block_sparse_moe.gate": "mlp.gate"}`: a plain rename.
- `stacked_experts = StackedExperts(...)` (llmexec.models.moe): per-expert
  tensors stacked into [num_experts, ...] parameters, several parts
  concatenated per expert (Mixtral's w1 and w3 into gate_up_proj).
A checkpoint that already holds the fused tensor (Phi-3's qkv_proj) maps to it unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from llmexec.errors import CheckpointError
from llmexec.loader.checkpoint import TensorSpec
from llmexec.models.moe import StackedExperts


@dataclass(frozen=True)
class SourceSlice:
    """One checkpoint tensor's place in a target: it fills target[index][offset : offset + shape[0]].

    With a `cut` (a tensor-parallel rank's part, llmexec.loader.tp_plan) only
    tensor.narrow(dim, start, length) is taken, and it lands at `offset` along
    that same dim of target[index].
    """

    name: str  # the checkpoint tensor
    shape: tuple[int, ...]  # its shape in the checkpoint
    index: tuple[int, ...] = ()  # leading target dims it sits at (the expert, for stacked experts)
    offset: int = 0  # its first row along the first dim after `index`
    cut: tuple[int, int, int] | None = None  # (dim, start, length) of the checkpoint tensor taken; None: all


@dataclass(frozen=True)
class TargetTensor:
    """One model parameter as the loader writes it: contiguous, `shape`, `dtype`, filled by `sources`."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[SourceSlice, ...]

    @property
    def is_passthrough(self) -> bool:
        """One checkpoint tensor, whole and unchanged: no copy needed in process."""
        source = self.sources[0] if len(self.sources) == 1 else None
        return source is not None and source.index == () and source.cut is None and source.shape == self.shape


@dataclass(frozen=True)
class _Placement:
    """Where one checkpoint tensor goes: part `position` of `parts`, at `index`, in `target`."""

    target: str
    parts: tuple[str, ...]  # the checkpoint names that fill the target, in row order
    index: tuple[int, ...] = ()
    position: int = 0
    num_experts: int | None = None  # set for stacked experts


@dataclass
class _Group:
    """Sources gathered for one target while planning."""

    parts: tuple[str, ...]
    num_experts: int | None
    found: dict[tuple[tuple[int, ...], int], TensorSpec] = field(default_factory=dict)  # (index, part) -> spec


class _Rules:
    """A model class's fusing declarations, applied to one checkpoint name at a time."""

    def __init__(self, model_cls: type, config: Mapping) -> None:
        self.packed = {
            part: (fused, position, tuple(parts))
            for fused, parts in getattr(model_cls, "packed_modules_mapping", {}).items()
            for position, part in enumerate(parts)
        }
        self.renamed = getattr(model_cls, "renamed_modules", {})
        self.experts: StackedExperts | None = getattr(model_cls, "stacked_experts", None)
        if self.experts is not None:
            module = re.escape(self.experts.checkpoint_module)
            self.expert_name = re.compile(rf"(?:(.*)\.)?{module}\.(\d+)\.([^.]+)\.weight")
            self.num_experts = int(config[self.experts.num_experts_key])

    def place(self, checkpoint_name: str) -> _Placement:
        name = self.renamed_name(checkpoint_name)
        match = self.expert_name.fullmatch(name) if self.experts is not None else None
        if match:
            prefix, expert, part = match.groups()
            for param, parts in self.experts.params.items():
                if part in parts:
                    target = _dotted(prefix, self.experts.model_module, param)
                    return _Placement(target, tuple(parts), (int(expert),), parts.index(part), self.num_experts)
        module, _, param = name.rpartition(".")
        prefix, _, leaf = module.rpartition(".")
        if leaf in self.packed:
            fused, position, parts = self.packed[leaf]
            return _Placement(_dotted(prefix, fused, param), parts, (), position)
        return _Placement(name, (checkpoint_name,))

    def renamed_name(self, name: str) -> str:
        for old, new in self.renamed.items():
            if name.startswith(f"{old}."):
                name = new + name[len(old) :]
            name = name.replace(f".{old}.", f".{new}.")
        return name


def plan_weights(
    model_cls: type, config: Mapping, checkpoint_specs: Sequence[TensorSpec], source: str = ""
) -> list[TargetTensor]:
    """Every target tensor `model_cls` needs, in checkpoint order of their first source.

    Raises CheckpointError (its message prefixed with `source`, the checkpoint's
    path, when given) when a fused or stacked target lacks a part, when its parts
    disagree in trailing shape or dtype, or when a checkpoint holds both the fused
    tensor and its parts.
    """
    try:
        rules = _Rules(model_cls, config)
        groups: dict[str, _Group] = {}
        for spec in checkpoint_specs:
            place = rules.place(spec.name)
            group = groups.setdefault(place.target, _Group(place.parts, place.num_experts))
            if group.parts != place.parts or (place.index, place.position) in group.found:
                raise CheckpointError(
                    f"checkpoint tensor {spec.name} maps to {place.target}, which other tensors already fill "
                    f"({', '.join(s.name for s in group.found.values())}); it holds both a fused tensor and its parts?"
                )
            group.found[(place.index, place.position)] = spec
        return [_target(name, group) for name, group in groups.items()]
    except CheckpointError as error:
        if not source:
            raise
        raise CheckpointError(f"{source}: {error}") from None


def passthrough_plan(checkpoint_specs: Sequence[TensorSpec]) -> list[TargetTensor]:
    """Every checkpoint tensor as its own target, unchanged."""
    return [TargetTensor(s.name, s.shape, s.dtype, (SourceSlice(s.name, s.shape),)) for s in checkpoint_specs]


def materialize(plan: Sequence[TargetTensor], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plan's targets from in-memory checkpoint tensors (tests, small tools).

    A pass-through target is the given tensor itself (no copy); fused and
    stacked targets are new tensors. Raises CheckpointError for a missing or
    wrong-shaped source.
    """
    result = {}
    for target in plan:
        if target.is_passthrough:
            source = target.sources[0]
            result[target.name] = _checked(tensors, source)
            continue
        # Zeros: rows no source fills (a rank's vocabulary padding, a row-parallel bias off rank 0) stay 0.
        filled = torch.zeros(target.shape, dtype=target.dtype)
        for source in target.sources:
            fill_slice(filled, source, _checked(tensors, source))
        result[target.name] = filled
    return result


def fill_slice(target: torch.Tensor, source: SourceSlice, tensor: torch.Tensor) -> None:
    """Copy `tensor` (casting; its cut when the source has one) into its slice of `target`, in place."""
    place = target[source.index]
    if source.cut is not None:
        dim, start, length = source.cut
        tensor = tensor.narrow(dim, start, length)
        place = place.narrow(dim, source.offset, length)
    elif source.shape:  # a 0-dim tensor (e.g. an old checkpoint's scalar buffer) has no rows to narrow
        place = place.narrow(0, source.offset, source.shape[0])
    place.copy_(tensor)


def specs_of(tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """TensorSpecs of in-memory tensors, as a checkpoint reader would list them."""
    return [
        TensorSpec(name, tuple(t.shape), t.dtype, str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()
    ]


def _dotted(*names: str | None) -> str:
    return ".".join(name for name in names if name)


def _checked(tensors: Mapping[str, torch.Tensor], source: SourceSlice) -> torch.Tensor:
    tensor = tensors.get(source.name)
    if tensor is None:
        raise CheckpointError(f"tensor {source.name} is in the plan but was not given")
    if tuple(tensor.shape) != source.shape:
        raise CheckpointError(
            f"tensor {source.name} has shape {list(tensor.shape)}, the plan says {list(source.shape)}"
        )
    return tensor


def _target(name: str, group: _Group) -> TargetTensor:
    if len(group.parts) == 1 and group.num_experts is None:
        [spec] = group.found.values()
        return TargetTensor(name, spec.shape, spec.dtype, (SourceSlice(spec.name, spec.shape),))
    indices = [(e,) for e in range(group.num_experts)] if group.num_experts is not None else [()]
    missing = [
        group.parts[position] + (f" of expert {index[0]}" if index else "")
        for index in indices
        for position in range(len(group.parts))
        if (index, position) not in group.found
    ]
    if missing:
        have = next(iter(group.found.values())).name
        raise CheckpointError(
            f"{name} is made of {', '.join(group.parts)}; the checkpoint has {have} but lacks {missing}"
        )
    extra = sorted({index[0] for index, _ in group.found} - {index[0] for index in indices}) if indices != [()] else []
    if extra:
        raise CheckpointError(f"{name}: the checkpoint has experts {extra}, the config only {group.num_experts}")
    first = group.found[(indices[0], 0)]
    sources, rows = [], 0
    for position in range(len(group.parts)):
        part_specs = [group.found[(index, position)] for index in indices]
        for spec in part_specs:
            if not spec.shape or spec.shape[1:] != first.shape[1:] or spec.shape[0] != part_specs[0].shape[0]:
                raise CheckpointError(
                    f"{name}: tensor {spec.name} has shape {list(spec.shape)}, which does not stack with "
                    f"{first.name} {list(first.shape)}"
                )
            if spec.dtype != first.dtype:
                raise CheckpointError(f"{name}: tensor {spec.name} is {spec.dtype} but {first.name} is {first.dtype}")
        sources += [SourceSlice(spec.name, spec.shape, index, rows) for index, spec in zip(indices, part_specs)]
        rows += part_specs[0].shape[0]
    shape = (*(() if group.num_experts is None else (group.num_experts,)), rows, *first.shape[1:])
    return TargetTensor(name, shape, first.dtype, tuple(sorted(sources, key=lambda s: (s.index, s.offset))))
