"""Making checkpoint tensors a model's parameters, as they are: no copy, no reordering.

Models whose parameters correspond one to one to checkpoint tensors (GPT-2, GPT-NeoX,
OPT, BLOOM) only say how a checkpoint name maps to a parameter name; the strict
checks and the zero-copy binding live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from llmexec.errors import CheckpointError


def bind_checkpoint_tensors(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    parameter_name: Callable[[str], str | None],
) -> None:
    """Make each checkpoint tensor the parameter `parameter_name(checkpoint name)` names.

    `parameter_name` returns None for entries to drop (buffers old checkpoints saved, the
    head of a tied model). Strict: every parameter must be filled exactly once, with its
    exact shape and the embedding's dtype, and no other name may remain; raises
    CheckpointError naming the offending tensors. The parameters share the given
    tensors' storage (a loader's shared memory stays shared).
    """
    params = dict(model.named_parameters())
    source_of: dict[str, str] = {}  # parameter name -> checkpoint name
    unexpected = []
    for name in weights:
        target = parameter_name(name)
        if target is None:
            continue
        if target not in params:
            unexpected.append(name)
        elif target in source_of:
            raise CheckpointError(f"checkpoint tensors {source_of[target]!r} and {name!r} both fill {target!r}")
        else:
            source_of[target] = name
    missing = sorted(params.keys() - source_of.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match {type(model).__name__}: missing {missing}, unexpected {sorted(unexpected)}"
        )
    for target, name in source_of.items():
        if tuple(weights[name].shape) != tuple(params[target].shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(weights[name].shape)}, expected {tuple(params[target].shape)}"
            )
    first = next(iter(source_of.values()))
    dtype = weights[first].dtype
    wrong_dtype = sorted(name for name in source_of.values() if weights[name].dtype != dtype)
    if wrong_dtype:
        raise CheckpointError(f"tensors {wrong_dtype} are not {dtype} like {first!r}")

    for target, name in source_of.items():
        module_name, _, attr = target.rpartition(".")
        # nn.Parameter wraps the given tensor itself: same storage, no copy.
        model.get_submodule(module_name)._parameters[attr] = nn.Parameter(weights[name], requires_grad=False)


def with_prefix(name: str, prefix: str, top_level: tuple[str, ...] = ("lm_head.",)) -> str:
    """`name` under `prefix` (e.g. "transformer."), unless it has it or is a top-level name.

    Original GPT-2 and BLOOM checkpoints store the base model's tensors without the
    prefix transformers' *ForCausalLM classes add ("h.0.attn.c_attn.weight").
    """
    return name if name.startswith((prefix, *top_level)) else prefix + name
