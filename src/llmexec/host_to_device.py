"""Small host lists to the device without waiting for the GPU.

A copy from pageable host memory synchronizes the stream before it starts, so
`torch.tensor(ids, device="cuda")` waits for every kernel queued before it:
on the decode path that would stall the host until the running step is done,
which is exactly what async scheduling must avoid (the runner queues a step
behind the running one; llmexec.step). Staging the list in pinned
memory makes the copy asynchronous (torch's pinned allocator keeps the buffer
alive until the copy has run).
"""

from __future__ import annotations

import torch


def to_device(values: list[int] | list[float], device: torch.device | str,
              dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """values as a tensor on device; on CUDA the copy is queued, not waited for."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def tensor_to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on device (and dtype); on CUDA through pinned memory, queued, not waited for."""
    if torch.device(device).type != "cuda":
        return tensor.to(device, dtype)
    return tensor.pin_memory().to(device, dtype, non_blocking=True)
