"""Where a loaded model's tensors live in shared memory.

The loader writes a WeightLayout, the runner reads one; the loader service
converts it to and from the WeightSegment/TensorLocation protobuf messages.
Plain Python with no torch import, so code that only passes layouts around
(the scheduler, RPC glue) stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WeightSegment:
    """One shared-memory region: a file under /dev/shm on CPU."""

    path: str
    size_bytes: int


@dataclass(frozen=True)
class TensorLocation:
    """One named tensor inside a segment: contiguous, row-major, native byte order.

    `dtype` is the torch dtype name without "torch.", e.g. "float32".
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    segment_index: int
    offset_bytes: int


@dataclass(frozen=True)
class WeightLayout:
    segments: list[WeightSegment] = field(default_factory=list)
    tensors: list[TensorLocation] = field(default_factory=list)
