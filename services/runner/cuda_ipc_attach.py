"""Opening the loader's GPU weights in a runner through CUDA IPC, without copying.

The loader exports its one weight allocation per model (llmexec.loader.device_store);
the runner rebuilds it from the typed handle fields with torch's own IPC code
(rebuild_cuda_tensor: cudaIpcOpenMemHandle plus torch's reference counter, so the
loader's memory is not freed under a live importer) and views each tensor inside it.

Lifetime: the mapping lasts while any of the returned tensors does. Dropping them all
(the runner detaching) or the runner process dying closes it; the driver releases a
dead process's mappings. The loader's copy is unaffected either way.
"""

from __future__ import annotations

import torch

from llmexec.errors import FailedPreconditionError, InvalidArgumentError
from llmexec.runner.weight_attach import views_in_segments
from llmexec.weight_layout import CudaIpcHandle, WeightLayout


def local_device_index(device_uuid: str, exporter_index: int) -> int:
    """This process's index of the GPU with `device_uuid` (CUDA_VISIBLE_DEVICES may renumber)."""
    if not torch.cuda.is_available():
        raise FailedPreconditionError("the loader holds the weights on a GPU, but this runner sees no CUDA device")
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == device_uuid:
            return index
    if not device_uuid and exporter_index < torch.cuda.device_count():
        return exporter_index
    raise FailedPreconditionError(
        f"the loader's weights are on GPU {device_uuid} (its cuda:{exporter_index}), which this runner cannot see; "
        "run the runner on the same GPU as the loader"
    )


def open_cuda_segment(handle: CudaIpcHandle) -> torch.Tensor:
    """The exported allocation as a flat uint8 tensor on this process's matching device."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    index = local_device_index(handle.device_uuid, handle.device_index)
    size = handle.storage_size_bytes
    try:
        return rebuild_cuda_tensor(
            torch.Tensor, (size,), (1,), 0, torch.storage.TypedStorage, torch.uint8, index,
            handle.memory_handle, size, handle.storage_offset_bytes, False,
            handle.ref_counter_handle, handle.ref_counter_offset,
            handle.event_handle or None, handle.event_sync_required,
        )  # fmt: skip
    except RuntimeError as error:  # a stale handle (the loader exited) or another host's
        raise FailedPreconditionError(
            f"could not open the loader's GPU weights over CUDA IPC ({error}); the loader restarted? "
            "Ask it for the weight layout again"
        ) from error


def attach_cuda_weights(layout: WeightLayout) -> dict[str, torch.Tensor]:
    """name -> view into the loader's device segments, as weight_attach.attach_weights does for /dev/shm."""
    buffers = []
    for segment in layout.segments:
        if segment.cuda_ipc is None:
            raise InvalidArgumentError("a weight layout mixes shared-memory and GPU segments")
        buffer = open_cuda_segment(segment.cuda_ipc)
        if buffer.numel() < segment.size_bytes:
            raise FailedPreconditionError(
                f"the loader's GPU segment has {buffer.numel()} bytes, the layout says {segment.size_bytes}"
            )
        buffers.append(buffer)
    return views_in_segments(layout, buffers)
