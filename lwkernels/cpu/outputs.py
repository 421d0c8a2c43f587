"""Output tensors of the eager CPU fast paths, in memory from lwkernels' own buffer pool.

PyTorch's CPU allocator passes allocations of a block's output size (hundreds of KiB to tens of
MiB) to malloc, which maps them afresh and unmaps them when they are freed: every call of a block
paid a page fault per 4 KiB page of its output, up to a third of the call (docs/performance.md).
The pool (csrc/buffer_pool.h) keeps released buffers, by size, for the next output of that size;
the tensors it backs are ordinary CPU tensors (made through DLPack) that give their buffer back
when PyTorch frees them. At most LWKERNELS_CPU_OUTPUT_CACHE_MB MiB (default 1024, read when the
kernels load; 0 disables the cache) wait for reuse; lwkernels.clear_cache() frees them.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

#: Environment variable: MiB of released output buffers kept for reuse (default 1024; 0: none).
OUTPUT_CACHE_ENV = "LWKERNELS_CPU_OUTPUT_CACHE_MB"
DEFAULT_OUTPUT_CACHE_MB = 1024

_ITEMSIZE = {torch.float32: 4, torch.float64: 8}
_from_dlpack = getattr(torch._C, "_from_dlpack", None) or torch.from_dlpack


def apply_cache_limit_from_env(_C) -> None:
    """Sets the pool's limit from LWKERNELS_CPU_OUTPUT_CACHE_MB (lwkernels.cpu.backend.native())."""
    raw = os.environ.get(OUTPUT_CACHE_ENV, "").strip()
    try:
        mb = float(raw) if raw else float(DEFAULT_OUTPUT_CACHE_MB)
        if mb < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{OUTPUT_CACHE_ENV}={raw!r} is not a non-negative number of MiB") from None
    _C.set_output_pool_limit(int(mb * (1 << 20)))


def _strides(shape: Tuple[int, ...], memory_format: torch.memory_format) -> Tuple[int, ...]:
    if memory_format == torch.channels_last:
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def new_output(_C, shape: Tuple[int, ...], dtype: torch.dtype,
               memory_format: torch.memory_format) -> torch.Tensor:
    """An uninitialised float32/float64 CPU tensor of `shape` (4-D for channels_last), dense in
    `memory_format`, from the pool."""
    return _from_dlpack(_C.pooled_tensor(list(shape), list(_strides(shape, memory_format)), _ITEMSIZE[dtype]))


def output_cache_stats() -> dict:
    """Bytes waiting for reuse, the limit, and how many outputs reused a buffer (hits) or not (misses)."""
    from .backend import native

    return dict(native().output_pool_stats())
