"""Mapping the loader's shared-memory weights into a runner, without copying."""

from __future__ import annotations

import os

import torch

from llmexec.errors import FailedPreconditionError, InvalidArgumentError
from llmexec.weight_layout import WeightLayout


def attach_weights(layout: WeightLayout) -> dict[str, torch.Tensor]:
    """Map every segment of `layout` (MAP_SHARED) and return name -> view.

    Each tensor has its TensorLocation's shape and dtype and points into the
    mapping; nothing is copied. The views hold the mapping alive, so it lasts
    as long as any tensor does, even after the loader unlinks the file.
    Writes through the views change the loader's copy: treat them as read-only.
    Raises FailedPreconditionError when a segment file is missing or has the
    wrong size, InvalidArgumentError when a tensor falls outside its segment.
    """
    buffers = [_map_segment(segment.path, segment.size_bytes) for segment in layout.segments]
    return views_in_segments(layout, buffers)


def views_in_segments(layout: WeightLayout, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """name -> a view of each TensorLocation inside its segment's uint8 buffer (no copy).

    Shared by the /dev/shm and the CUDA IPC attach paths. Raises InvalidArgumentError
    when a location names a missing segment, an unknown dtype, or bytes outside its segment.
    """
    tensors = {}
    for location in layout.tensors:
        if not 0 <= location.segment_index < len(buffers):
            raise InvalidArgumentError(
                f"tensor {location.name} is in segment {location.segment_index}, "
                f"but the layout has {len(buffers)} segments"
            )
        dtype = getattr(torch, location.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise InvalidArgumentError(f"tensor {location.name} has unknown dtype {location.dtype!r}")
        numel = 1
        for size in location.shape:
            numel *= size
        begin, end = location.offset_bytes, location.offset_bytes + numel * dtype.itemsize
        buffer = buffers[location.segment_index]
        if begin < 0 or end > buffer.numel():
            raise InvalidArgumentError(
                f"tensor {location.name} spans bytes [{begin}, {end}) of a {buffer.numel()}-byte segment"
            )
        tensors[location.name] = buffer[begin:end].view(dtype).view(tuple(location.shape))
    return tensors


def _map_segment(path: str, size_bytes: int) -> torch.Tensor:
    try:
        actual = os.stat(path).st_size
    except FileNotFoundError:
        raise FailedPreconditionError(
            f"weight segment {path} does not exist; the loader restarted or unloaded the model? "
            "Ask it for the weight layout again"
        ) from None
    if actual != size_bytes:
        raise FailedPreconditionError(
            f"weight segment {path} has {actual} bytes, the layout says {size_bytes}; "
            "the layout is stale (the loader restarted?). Ask it for the weight layout again"
        )
    # Checked above rather than left to from_file: with shared=True it would
    # silently create or grow the file instead of failing.
    return torch.from_file(path, shared=True, size=size_bytes, dtype=torch.uint8)
