"""How a model is split across tensor-parallel ranks: a description the loader and the runner share.

A model class that supports tensor parallelism declares `tensor_parallel_plan(config)`:
fnmatch patterns over module names (or, for stacked experts, parameter names) mapped
to how their weights split. Whatever no pattern names is replicated on every rank.

- ColumnSplit: the output rows split, part by part. A fused q/k/v weight is three
  parts (q heads, k heads, v heads), each cut by heads, so rank r holds its q heads
  and the K/V heads they read; with fewer KV heads than ranks each KV head is
  replicated on the ranks whose query heads use it. The output stays split.
- RowSplit: the input columns split; each rank's output is a partial sum, all-reduced
  (one all-reduce per o_proj / down_proj). Its bias is added once: rank 0 holds it,
  the others hold zeros.
- VocabSplit: embedding and LM head rows split in blocks of ceil(vocab / N), the last
  one zero-padded; the embedding looks up the ids it holds and all-reduces, the head's
  logits are gathered (only for the rows that sample).

`rank_config` gives the config whose model has exactly one rank's shapes (heads, KV
heads, intermediate size and vocabulary divided), so every model class builds its
rank's modules without knowing about ranks. Pure: no torch.distributed here.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

from llmexec.errors import InvalidArgumentError
from llmexec.models.config_keys import standard_config


@dataclass(frozen=True)
class ColumnSplit:
    """Output rows split per part. parts: (units, rows per unit) each, in row order, e.g.
    ((heads, head_dim), (kv_heads, head_dim), (kv_heads, head_dim)) for q/k/v.
    dim: the split dim of the parameter (1 for experts stacked [E, rows, in])."""

    parts: tuple[tuple[int, int], ...]
    dim: int = 0


@dataclass(frozen=True)
class RowSplit:
    """Input columns (the last dim) split evenly; outputs all-reduced; bias on rank 0 only."""


@dataclass(frozen=True)
class VocabSplit:
    """Rows (dim 0) split in blocks of ceil(rows / N); the last block zero-padded."""


Split = ColumnSplit | RowSplit | VocabSplit
ROW = RowSplit()
VOCAB = VocabSplit()

# Suffixes of the tensors one linear layer holds (llmexec.quantization's components too).
LINEAR_TENSORS = ("weight", "bias", "weight_q", "weight_scale", "weight_offset", "weight_g_idx")


def plan_for(model_class: type, config: Mapping, tensor_parallel_size: int) -> dict[str, Split]:
    """The class's split plan for `config`, after checking every split divides by the size.

    Raises InvalidArgumentError naming what does not divide, or that the architecture
    has no plan (tensor parallelism is not supported for it).
    """
    if tensor_parallel_size < 1:
        raise InvalidArgumentError(f"tensor parallel size must be >= 1, got {tensor_parallel_size}")
    make_plan = getattr(model_class, "tensor_parallel_plan", None)
    if make_plan is None:
        raise InvalidArgumentError(f"tensor parallelism is not supported for {model_class.__name__} yet")
    config = standard_config(config)
    check_divisible(config, tensor_parallel_size)
    return make_plan(config)


def check_divisible(config: Mapping, size: int) -> None:
    """Refuse a size that does not split the heads, KV heads or intermediate size evenly."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % size:
        raise InvalidArgumentError(
            f"tensor parallel size {size} does not divide the {heads} attention heads; "
            f"use one of {_divisors(heads)}"
        )
    if kv_heads % size and size % kv_heads:
        raise InvalidArgumentError(
            f"tensor parallel size {size} neither divides the {kv_heads} KV heads nor is a multiple of them "
            "(each KV head is replicated on the ranks whose query heads read it)"
        )
    intermediate = config.get("intermediate_size")
    if intermediate and intermediate % size:
        raise InvalidArgumentError(f"tensor parallel size {size} does not divide intermediate_size {intermediate}")


def rank_config(config: Mapping, size: int) -> dict:
    """The config whose model has one rank's shapes: heads, KV heads (at least 1),
    intermediate size divided by `size`, vocabulary ceil(vocab / size); head_dim explicit."""
    config = standard_config(config)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    local = dict(config, num_attention_heads=heads // size, num_key_value_heads=max(1, kv_heads // size),
                 head_dim=head_dim, vocab_size=vocab_rows(config["vocab_size"], size))
    if config.get("intermediate_size"):
        local["intermediate_size"] = config["intermediate_size"] // size
    return local


def vocab_rows(vocab_size: int, size: int) -> int:
    """Rows of the embedding / LM head each rank holds."""
    return -(-vocab_size // size)


def split_of(plan: Mapping[str, Split], name: str) -> tuple[Split | None, str]:
    """(the split of tensor `name`, its suffix): a module pattern matches `<module>.<suffix>` for
    the linear-layer suffixes; a parameter pattern matches the name itself (suffix "").
    (None, "") when the tensor is replicated."""
    module, _, suffix = name.rpartition(".")
    for pattern, split in plan.items():
        if suffix in LINEAR_TENSORS and fnmatch.fnmatchcase(module, pattern):
            return split, suffix
        if fnmatch.fnmatchcase(name, pattern):
            return split, ""
    return None, ""


def column_rows(split: ColumnSplit, size: int, rank: int) -> list[tuple[int, int]]:
    """The [start, end) rows (along split.dim, in the unsplit tensor) rank `rank` holds, part by part.

    A part of U units gives each rank U / size consecutive units; with fewer units than
    ranks (KV heads), rank r holds unit r // (size / U), replicated.
    """
    ranges, part_start = [], 0
    for units, unit_rows in split.parts:
        if units % size == 0:
            per_rank = units // size
            first, count = rank * per_rank, per_rank
        elif size % units == 0:
            first, count = rank // (size // units), 1
        else:
            raise InvalidArgumentError(f"tensor parallel size {size} cannot split {units} units of {unit_rows} rows")
        ranges.append((part_start + first * unit_rows, part_start + (first + count) * unit_rows))
        part_start += units * unit_rows
    return ranges


def rank_shape(shape: tuple[int, ...], split: Split | None, suffix: str, size: int) -> tuple[int, ...]:
    """The shape rank-local tensors of `shape` have under `split` (the same on every rank)."""
    if split is None or size == 1 or not shape or suffix == "weight_g_idx":
        return tuple(shape)
    if isinstance(split, VocabSplit):
        return (vocab_rows(shape[0], size), *shape[1:])
    if isinstance(split, ColumnSplit):
        dim = split.dim
        rows = sum(end - start for start, end in column_rows(split, size, 0))
        return (*shape[:dim], rows, *shape[dim + 1 :])
    if len(shape) == 1:  # a row-split layer's bias or per-channel scale: whole on each rank
        return tuple(shape)
    if shape[-1] % size:
        raise InvalidArgumentError(
            f"tensor parallel size {size} cannot split the last dim of a {list(shape)} tensor evenly "
            "(its input columns, or their int4 groups)"
        )
    return (*shape[:-1], shape[-1] // size)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
