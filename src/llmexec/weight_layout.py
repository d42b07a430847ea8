"""Where a loaded model's tensors live in shared memory.

The loader writes a WeightLayout, the runner reads one; the loader service
converts it to and from the WeightSegment/TensorLocation protobuf messages.
Plain Python with no torch import, so code that only passes layouts around
(the scheduler, RPC glue) stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CudaIpcHandle:
    """How another process on the host opens a device allocation: the fields of
    torch.multiprocessing.reductions.reduce_tensor's CUDA result, typed (never pickled)."""

    device_index: int
    device_uuid: str  # the GPU's UUID: importers may number the devices differently
    memory_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


@dataclass(frozen=True)
class WeightSegment:
    """One shared region: a file under /dev/shm on CPU (path), or a device allocation
    exported through CUDA IPC (cuda_ipc; path empty)."""

    path: str
    size_bytes: int
    cuda_ipc: CudaIpcHandle | None = None


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
