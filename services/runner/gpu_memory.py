"""Sizing the KV cache on a GPU from the memory left once the weights are in place.

`--gpu-memory-utilization U` caps what the whole device holds once this runner's cache is
allocated at U x its total memory. The device-wide use is read from the driver, so it
counts the loader's weights (which attached runners share, and must not count again),
other runners' caches and every CUDA context. A profile forward pass of the largest step
the runner expects measures the activations' peak, which stays free for serving, and a
fixed reserve covers CUDA graphs, sampling temporaries and the allocator's slack.
Starting two runners on one GPU: give the first a lower U than the second.
"""

from __future__ import annotations

import gc
import logging

import torch

from llmexec.errors import ResourceExhaustedError
from llmexec.models.attention import AttentionMetadata
from llmexec.step import SequenceInput, StepInput

log = logging.getLogger(__name__)

RESERVE_BYTES = 1 << 30


def profile_activation_bytes(model, num_tokens: int, kv_shape: tuple[int, int, int, int], dtype: torch.dtype,
                             device: torch.device, num_logit_rows: int) -> int:
    """kv_shape: (num_layers, block_size, kv_heads, head_dim). Peak bytes a forward pass of one `num_tokens`-token prefill (plus logits for
    num_logit_rows rows) allocates beyond what is allocated now. Uses a one-block scratch
    KV cache per layer and writes nothing to it (every slot is padding)."""
    num_layers, block_size, num_kv_heads, head_dim = kv_shape
    scratch = [
        (torch.zeros((1, block_size, num_kv_heads, head_dim), dtype=dtype, device=device),
         torch.zeros((1, block_size, num_kv_heads, head_dim), dtype=dtype, device=device))
        for _ in range(num_layers)
    ]
    num_blocks = -(-num_tokens // block_size)
    step = StepInput(
        input_ids=[0] * num_tokens, positions=list(range(num_tokens)), slot_mapping=[-1] * num_tokens,
        sequences=[SequenceInput(num_tokens, num_tokens, [0] * num_blocks, True)],
    )
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        positions = torch.arange(num_tokens, dtype=torch.int64, device=device)
        metadata = AttentionMetadata.build(step, block_size, device)
        hidden = model(input_ids, positions, metadata, scratch)
        rows = torch.arange(num_tokens - min(num_logit_rows, num_tokens), num_tokens, device=device)
        logits = model.compute_logits(hidden[rows])
        torch.softmax(logits, dim=-1)  # what random sampling adds on top
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del scratch, hidden, logits, metadata
    gc.collect()
    torch.cuda.empty_cache()
    return max(peak, 0)


def kv_cache_blocks(bytes_per_block: int, utilization: float, activation_bytes: int, device: torch.device) -> int:
    """Blocks that fit under utilization x total after what the device holds now and the reserve."""
    if not 0.0 < utilization <= 1.0:
        raise ResourceExhaustedError(f"gpu_memory_utilization must lie in (0, 1], got {utilization}")
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    budget = int(utilization * total) - used - activation_bytes - RESERVE_BYTES
    num_blocks = budget // bytes_per_block
    log.info("GPU memory: %.1f GiB total, %.1f GiB in use, activations %.2f GiB, reserve %.1f GiB -> KV cache "
             "%.1f GiB (%d blocks)", total / 2**30, used / 2**30, activation_bytes / 2**30, RESERVE_BYTES / 2**30,
             max(num_blocks, 0) * bytes_per_block / 2**30, max(num_blocks, 0))
    if num_blocks < 1:
        raise ResourceExhaustedError(
            f"no room for a KV cache: {used / 2**30:.1f} of {total / 2**30:.1f} GiB are in use and "
            f"--gpu-memory-utilization {utilization} allows {utilization * total / 2**30:.1f}; raise it or free the GPU"
        )
    return num_blocks
