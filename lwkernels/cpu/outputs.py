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
_inference_mode = torch.is_inference_mode_enabled


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


#: Outputs of at most this many bytes (a classifier's [N, classes]) are made OUTPUT_STOCK at a time.
SMALL_OUTPUT_BYTES = 64 << 10
OUTPUT_STOCK = 8


class OutputMaker:
    """New outputs of one shape, dtype and memory format, one per run of a native call (its caller
    holds the call's lock). Made after the previous run's kernels have evicted PyTorch's and the
    pool's code and objects from the caches, one tensor cost 22 us at batch 1 and 75 us at batch 8
    (mnasnet1_0's [N, 10], Intel Xeon); the ones made right after it, about 1 us each. Small outputs
    are therefore made OUTPUT_STOCK at a time and handed out one by one; each is handed out once.
    A tensor made under torch.inference_mode() is an inference tensor and one made outside is not,
    for good (an inference tensor cannot be saved for backward later): the stocks are kept per mode."""

    __slots__ = ("_C", "_shape", "_dtype", "_memory_format", "_stocks")

    def __init__(self, _C, shape: Tuple[int, ...], dtype: torch.dtype, memory_format: torch.memory_format) -> None:
        self._C, self._shape, self._dtype, self._memory_format = _C, tuple(shape), dtype, memory_format
        size = _ITEMSIZE[dtype]
        for n in self._shape:
            size *= n
        # (outside, inside inference mode); None: a new one per run
        self._stocks = ([], []) if size <= SMALL_OUTPUT_BYTES else None

    def take(self) -> torch.Tensor:
        """An output no one else holds, uninitialised."""
        if self._stocks is None:
            return new_output(self._C, self._shape, self._dtype, self._memory_format)
        stock = self._stocks[_inference_mode()]
        if not stock:
            stock += [new_output(self._C, self._shape, self._dtype, self._memory_format) for _ in range(OUTPUT_STOCK)]
        return stock.pop()
