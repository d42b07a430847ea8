"""Each tensor-parallel rank's weight plan: the full plan's targets cut to that rank's shard.

`plan_weights` says which checkpoint tensors fill each model parameter; here every
target is cut along its split (llmexec.models.tensor_parallel) and each source
keeps only the part of its checkpoint tensor that lands in rank r's shard, as a
`cut`. For a fused q/k/v target the rows are chosen per part: q, k and v each
by heads, whether the checkpoint holds them apart (Llama) or fused (Phi-3), so a
rank's shard is [its q heads; its k heads; its v heads]. The store streams the
checkpoint once and fills every rank's shard from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from llmexec.errors import InvalidArgumentError
from llmexec.loader.weight_plan import SourceSlice, TargetTensor
from llmexec.models.tensor_parallel import (
    ColumnSplit,
    RowSplit,
    Split,
    VocabSplit,
    column_rows,
    plan_for,
    rank_config,
    rank_shape,
    split_of,
    vocab_rows,
)

if TYPE_CHECKING:
    import torch


def rank_plans(
    model_class: type, config: Mapping, plan: Sequence[TargetTensor], size: int, dtype: torch.dtype | None,
    source: str,
) -> list[list[TargetTensor]]:
    """Each rank's plan for `size` ranks, checked against a rank's model as the runner will bind it.

    `dtype` as the store casts to (None: as the checkpoint yields). Raises
    InvalidArgumentError when the model does not split by `size` (heads, KV heads,
    intermediate size, an architecture without a plan), CheckpointError when a rank's
    shard does not fit the rank's model.
    """
    from llmexec.loader.binding_check import check_model_accepts
    from llmexec.loader.shm_store import plan_layout

    plans = shard_plans(plan, plan_for(model_class, config, size), size)
    # Every rank's shard has the same names and shapes: checking rank 0's covers them all.
    check_model_accepts(model_class, rank_config(config, size), plan_layout(plans[0], dtype)[0], source)
    return plans


def shard_plans(plan: Sequence[TargetTensor], splits: Mapping[str, Split], size: int) -> list[list[TargetTensor]]:
    """One plan per rank (rank r at index r); `splits` from llmexec.models.tensor_parallel.plan_for."""
    return [[shard_target(target, splits, size, rank) for target in plan] for rank in range(size)]


def shard_target(target: TargetTensor, splits: Mapping[str, Split], size: int, rank: int) -> TargetTensor:
    """`target` as rank `rank` of `size` holds it. Raises InvalidArgumentError when it does not split."""
    split, suffix = split_of(splits, target.name)
    try:
        shape = rank_shape(target.shape, split, suffix, size)
    except InvalidArgumentError as error:
        raise InvalidArgumentError(f"{target.name}: {error}") from None
    if split is None or size == 1:
        return target  # replicated
    if suffix == "weight_g_idx" and not isinstance(split, RowSplit):
        return target  # the input columns' groups, one row per fused part: the same on every rank
    if isinstance(split, VocabSplit):
        rows = vocab_rows(target.shape[0], size)
        sources = _rows_from(target.sources, [(rank * rows, min((rank + 1) * rows, target.shape[0]))], dim=0)
    elif isinstance(split, ColumnSplit):
        sources = _rows_from(target.sources, column_rows(split, size, rank), dim=split.dim)
    elif suffix == "weight_g_idx":
        raise InvalidArgumentError(
            f"{target.name}: int4 weights whose groups follow g_idx (GPTQ act-order, or a group size that does not "
            "divide the input width) cannot be split by input columns for tensor parallelism"
        )
    elif len(target.shape) == 1:
        # The bias is added once, after the all-reduce sums the ranks' partial outputs: rank 0 holds it, the
        # others zeros (no source). A per-channel scale applies to every rank's partial sum: whole on each.
        sources = target.sources if rank == 0 or suffix != "bias" else ()
    else:
        sources = _columns_from(target, shape[-1], rank)
    return replace(target, shape=shape, sources=tuple(sources))


def _rows_from(sources: Sequence[SourceSlice], kept: list[tuple[int, int]], dim: int) -> list[SourceSlice]:
    """The parts of `sources` inside the kept row ranges (along `dim` of the unsplit target), placed
    one after another along that dim of the rank's target."""
    result = []
    for source in sources:
        source_dim = dim - len(source.index)  # the source's own dim that lies along the split
        if source_dim < 0 or (source_dim > 0 and source.offset):
            raise InvalidArgumentError(f"{source.name}: cannot split along dim {dim} of its target")
        first = source.offset if source_dim == 0 else 0
        count = source.shape[source_dim]
        local_start = 0
        for start, end in kept:
            low, high = max(start, first), min(end, first + count)
            if low < high:
                cut = (source_dim, low - first, high - low)
                result.append(replace(source, offset=local_start + low - start, cut=cut))
            local_start += end - start
    return result


def _columns_from(target: TargetTensor, width: int, rank: int) -> list[SourceSlice]:
    """Each source's columns (its last dim) [rank * width, (rank + 1) * width)."""
    sources = []
    for source in target.sources:
        if not source.shape or source.shape[-1] != target.shape[-1] or source.offset:
            raise InvalidArgumentError(f"{source.name} {list(source.shape)} does not span the columns of {target.name}")
        sources.append(replace(source, cut=(len(source.shape) - 1, rank * width, width)))
    return sources
