"""The loader's copy of a model's weights in GPU memory: one allocation, exported over CUDA IPC.

The same packing as the shared-memory store (shm_store.plan_layout: every tensor at an
aligned offset of one segment), but the segment is a single device allocation. Runners
on the host open it through CUDA IPC (llmexec.runner.cuda_ipc_attach) and use the
tensors in place: N runners cost one copy of the weights. One allocation means one IPC
handle per model; per-tensor handles are reported several times slower to open.

Tensors are streamed in one at a time (from safetensors straight to the device, or
generated there for the dummy format), so the host never holds the model.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import torch

from llmexec.errors import CheckpointError, ResourceExhaustedError
from llmexec.loader.checkpoint import Checkpoint
from llmexec.loader.shm_store import SharedWeights, _stream, _view, plan_layout
from llmexec.loader.weight_plan import TargetTensor, passthrough_plan
from llmexec.weight_layout import CudaIpcHandle, WeightLayout, WeightSegment


class DeviceWeights(SharedWeights):
    """A model's tensors as views into one device allocation the loader owns."""

    def __init__(self, layout: WeightLayout, tensors: dict[str, torch.Tensor], buffer: torch.Tensor):
        super().__init__(layout, tensors)
        self.buffer = buffer

    @classmethod
    def create_on_device(
        cls,
        checkpoint: Checkpoint,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        plan: Sequence[TargetTensor] | None = None,
    ) -> DeviceWeights:
        """Allocate one buffer on `device` and fill it with `plan`'s targets, streaming `checkpoint`
        (as SharedWeights.create; same errors). Raises ResourceExhaustedError when the device
        has no room; nothing stays allocated on failure."""
        if plan is None:
            plan = passthrough_plan(checkpoint.tensor_specs())
        if not plan:
            raise CheckpointError(f"{checkpoint.source} holds no tensors")
        device = torch.device(device)
        locations, size = plan_layout(plan, dtype)
        try:
            buffer = torch.empty(size, dtype=torch.uint8, device=device)
        except torch.OutOfMemoryError as error:
            free, total = torch.cuda.mem_get_info(device)
            raise ResourceExhaustedError(
                f"{device} has {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, too little for "
                f"{size / 2**30:.2f} GiB of weights; free the GPU or load in a smaller dtype"
            ) from error
        try:
            tensors = {location.name: _view(buffer, location) for location in locations}
            _stream(checkpoint, plan, tensors)
            torch.cuda.synchronize(device)
        except BaseException:
            del buffer
            _release_cached(device)
            raise
        _release_cached(device)  # the streamed tensors' blocks: nobody else could use them
        layout = WeightLayout(segments=[WeightSegment(path="", size_bytes=size)], tensors=locations)
        return cls(layout, tensors, buffer)

    @property
    def path(self) -> str:
        return ""

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def export_cuda_ipc(self) -> CudaIpcHandle:
        """A fresh IPC handle of the whole buffer (each importer gets its own reference counter)."""
        from torch.multiprocessing.reductions import reduce_tensor

        _rebuild, args = reduce_tensor(self.buffer)
        (_cls, _size, _stride, tensor_offset, _storage_cls, _dtype, device_index, memory_handle, storage_size_bytes,
         storage_offset_bytes, _requires_grad, ref_counter_handle, ref_counter_offset, event_handle,
         event_sync_required) = args  # fmt: skip
        assert tensor_offset == 0, "the weight buffer is a whole storage"
        return CudaIpcHandle(
            device_index=int(device_index),
            device_uuid=device_uuid(int(device_index)),
            memory_handle=bytes(memory_handle),
            storage_size_bytes=int(storage_size_bytes),
            storage_offset_bytes=int(storage_offset_bytes),
            ref_counter_handle=bytes(ref_counter_handle),
            ref_counter_offset=int(ref_counter_offset),
            event_handle=bytes(event_handle) if event_handle is not None else b"",
            event_sync_required=bool(event_sync_required),
        )

    def close(self) -> None:
        """Drop the loader's references. Importers that still hold the memory keep it alive
        (torch's IPC reference counter defers the free); idempotent."""
        if not self._closed:
            self._closed = True
            device = self.buffer.device
            self.tensors = {}
            self.buffer = torch.empty(0, dtype=torch.uint8)
            _release_cached(device)


def device_uuid(device_index: int) -> str:
    return str(torch.cuda.get_device_properties(device_index).uuid)


def _release_cached(device: torch.device) -> None:
    gc.collect()
    with torch.cuda.device(device):
        torch.cuda.empty_cache()
