"""The loader's copy of a model's weights, in one shared-memory file.

Runners map the same file (llmexec.runner.weight_attach), so N runners on a
host cost one copy of the weights. Tensors are streamed into the mapping one at
a time, so loading never holds the model twice.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import tempfile
import time
from collections.abc import Sequence

import torch

from llmexec.errors import CheckpointError, ResourceExhaustedError
from llmexec.loader.checkpoint import Checkpoint
from llmexec.loader.weight_plan import SourceSlice, TargetTensor, fill_slice, passthrough_plan
from llmexec.weight_layout import TensorLocation, WeightLayout, WeightSegment

# tmpfs: pages live in RAM and any process on the host (or pod, with an
# in-memory emptyDir) can map them by path.
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
# Cache-line alignment; also a multiple of every dtype's size, so each
# offset can be viewed as that dtype.
ALIGNMENT = 64


class SharedWeights:
    """A model's tensors as views into one shared-memory file the loader owns."""

    def __init__(self, layout: WeightLayout, tensors: dict[str, torch.Tensor], lock_fd: int | None = None):
        self.layout = layout
        self.tensors = tensors
        # A shared flock on the file for as long as we own it: remove_stale_segments()
        # tells a dead loader's leftover file from a live one by it.
        self._lock_fd = lock_fd
        self._closed = False

    @classmethod
    def create(
        cls,
        model_id: str,
        checkpoint: Checkpoint,
        dtype: torch.dtype | None = None,
        plan: Sequence[TargetTensor] | None = None,
    ) -> SharedWeights:
        """Fill a new file under /dev/shm with `plan`'s target tensors, streaming `checkpoint`.

        `plan` (llmexec.loader.weight_plan.plan_weights) says which checkpoint
        tensors make each target (fused q/k/v, stacked experts); without it every
        checkpoint tensor is its own target. Floating targets are cast to `dtype`
        when given; otherwise each keeps the dtype `iter_tensors` yields (float32
        for GGUF). Raises CheckpointError when a streamed tensor's name or shape
        disagrees with the plan (built from `tensor_specs()`) or a planned tensor
        never arrives, ResourceExhaustedError when /dev/shm is too small; either
        way no file is left behind.
        """
        if plan is None:
            plan = passthrough_plan(checkpoint.tensor_specs())
        if not plan:
            raise CheckpointError(f"{checkpoint.source} holds no tensors")
        path = os.path.join(SHM_DIR, f"llmexec-{_file_safe(model_id)}-{secrets.token_hex(4)}")
        locations, size = plan_layout(plan, dtype)
        layout = WeightLayout(segments=[WeightSegment(path, size)], tensors=locations)
        lock_fd = None
        try:
            lock_fd = _reserve(path, size)
            buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
            tensors = {location.name: _view(buffer, location) for location in locations}
            _stream(checkpoint, plan, tensors)
        except BaseException:
            # Also on KeyboardInterrupt: a half-filled file would hold RAM until reboot.
            _unlink(path)
            _close_lock(lock_fd)
            raise
        return cls(layout, tensors, lock_fd)

    @classmethod
    def create_ranks(
        cls,
        model_id: str,
        checkpoint: Checkpoint,
        dtype: torch.dtype | None,
        plans: Sequence[Sequence[TargetTensor]],
    ) -> list[SharedWeights]:
        """One file per tensor-parallel rank, each filled with its plan's targets
        (llmexec.loader.tp_plan.shard_plans), from a single pass over `checkpoint`.

        Raises as `create`; on any failure no file is left behind.
        """
        paths: list[str] = []
        lock_fds: list[int] = []
        try:
            shards, stores = [], []
            for rank, plan in enumerate(plans):
                path = os.path.join(SHM_DIR, f"llmexec-{_file_safe(model_id)}-rank{rank}-{secrets.token_hex(4)}")
                locations, size = plan_layout(plan, dtype)
                lock_fds.append(_reserve(path, size))
                paths.append(path)
                buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
                tensors = {location.name: _view(buffer, location) for location in locations}
                layout = WeightLayout(segments=[WeightSegment(path, size)], tensors=locations)
                shards.append(cls(layout, tensors, lock_fds[-1]))
                stores.append((plan, tensors))
            _stream_into(checkpoint, stores)
        except BaseException:
            for path in paths:
                _unlink(path)
            for fd in lock_fds:
                _close_lock(fd)
            raise
        return shards

    @property
    def path(self) -> str:
        return self.layout.segments[0].path

    @property
    def parameter_count(self) -> int:
        return sum(_numel(location.shape) for location in self.layout.tensors)

    @property
    def bytes_by_dtype(self) -> dict[str, int]:
        """Bytes of tensor data per dtype name, alignment padding excluded."""
        totals: dict[str, int] = {}
        for location in self.layout.tensors:
            nbytes = _numel(location.shape) * getattr(torch, location.dtype).itemsize
            totals[location.dtype] = totals.get(location.dtype, 0) + nbytes
        return totals

    def close(self) -> None:
        """Unlink the file. Mappings still open (ours, runners') stay valid
        until dropped; the RAM is freed when the last one goes. Idempotent."""
        if not self._closed:
            self._closed = True
            _unlink(self.path)
            _close_lock(self._lock_fd)

    def __enter__(self) -> SharedWeights:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def plan_layout(targets: Sequence[TargetTensor], dtype: torch.dtype | None) -> tuple[list[TensorLocation], int]:
    """Place each target tensor at the next ALIGNMENT boundary of segment 0.

    Returns the locations, in plan order, and the segment size in bytes.
    """
    locations = []
    offset = 0
    for spec in targets:
        target = dtype if dtype is not None and spec.dtype.is_floating_point else spec.dtype
        offset = -(-offset // ALIGNMENT) * ALIGNMENT
        locations.append(TensorLocation(spec.name, dtype_name(target), spec.shape, 0, offset))
        offset += _numel(spec.shape) * target.itemsize
    return locations, max(offset, 1)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _reserve(path: str, size: int) -> int:
    """Create `path` with `size` bytes allocated; return an fd holding a shared flock on it."""
    # O_EXCL: never adopt a file some other process made with our name.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        # Allocate now: writing into a sparse tmpfs mapping that runs out of
        # space kills the process with SIGBUS instead of raising.
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # macOS: no way to reserve, only to size
            os.ftruncate(fd, size)
    except BaseException as error:
        os.close(fd)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.ENOMEM):
            raise ResourceExhaustedError(
                f"{SHM_DIR} has no room for {size / 2**30:.2f} GiB of weights ({path}); "
                "enlarge it (e.g. a bigger in-memory emptyDir) or load in a smaller dtype"
            ) from error
        raise
    return fd


def _close_lock(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def remove_stale_segments(directory: str = SHM_DIR, min_age_s: float = 10.0) -> list[str]:
    """Unlink weight files no live loader owns (one killed with SIGKILL cannot clean up).

    Every loader holds a shared flock on its files while it lives; a file on which an
    exclusive lock can be taken has no owner. Files younger than min_age_s are left
    alone, so a file being created (locked a moment after it appears) is never taken.
    Returns the paths removed.
    """
    removed = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith("llmexec-")]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # a live loader's
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime >= min_age_s:
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _view(buffer: torch.Tensor, location: TensorLocation) -> torch.Tensor:
    """`location`'s tensor as a view of the flat uint8 `buffer`."""
    dtype = getattr(torch, location.dtype)
    nbytes = _numel(location.shape) * dtype.itemsize
    window = buffer[location.offset_bytes : location.offset_bytes + nbytes]
    return window.view(dtype).view(location.shape)


def _stream(checkpoint: Checkpoint, plan: Sequence[TargetTensor], targets: dict[str, torch.Tensor]) -> None:
    """Copy each streamed tensor into its slice of its target, casting; check name and shape."""
    _stream_into(checkpoint, [(plan, targets)])


def _stream_into(
    checkpoint: Checkpoint, stores: Sequence[tuple[Sequence[TargetTensor], dict[str, torch.Tensor]]]
) -> None:
    """Stream `checkpoint` once into several (plan, targets) stores (one per tensor-parallel rank):
    each tensor is copied, cast, into every slice any plan takes from it (a rank's slice of a
    fused tensor can take several)."""
    slices: dict[str, list[tuple[dict[str, torch.Tensor], str, SourceSlice]]] = {}
    for plan, targets in stores:
        for target in plan:
            for source in target.sources:
                slices.setdefault(source.name, []).append((targets, target.name, source))
    filled = set()
    for name, tensor in checkpoint.iter_tensors():
        if name not in slices:
            raise CheckpointError(f"{checkpoint.source}: tensor {name} was read but is not in its tensor list")
        if name in filled:
            raise CheckpointError(f"{checkpoint.source}: tensor {name} appears twice")
        for targets, target_name, source in slices[name]:
            if tuple(tensor.shape) != source.shape:
                raise CheckpointError(
                    f"{checkpoint.source}: tensor {name} has shape {list(tensor.shape)} "
                    f"but its header says {list(source.shape)}; the file is corrupt or changed while loading"
                )
            fill_slice(targets[target_name], source, tensor)
        filled.add(name)
    missing = [name for name in slices if name not in filled]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise CheckpointError(f"{checkpoint.source}: tensors listed but never read: {shown}")


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _file_safe(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)[:64] or "model"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
