"""Small helpers every Triton launcher here shares: availability, sizes, device facts.

Importing this module never imports triton, so the CPU backend works without it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in for the CPU interpreter."""
    if device.type != "cuda":
        return 4  # the interpreter runs programs one by one: few splits keep tests fast
    return _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: exact for float32 (tf32 would cost ~1e-3 relative), ignored for 16-bit."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    """The paged layout every kernel here reads: [num_blocks, block_size, kv_heads, head_dim], rows contiguous."""
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.shape[2] == num_kv_heads and k_cache.shape[3] == head_dim, (k_cache.shape, num_kv_heads, head_dim)
    assert k_cache.dtype == v_cache.dtype and k_cache.device == v_cache.device
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache rows must be contiguous along head_dim"
