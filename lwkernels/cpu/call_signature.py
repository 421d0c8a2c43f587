"""What every prepared call tells the plans that bind it (cpu/prepared_chain.py,
cpu/native_sequence.py) about the tensors it reads and writes."""
from __future__ import annotations

from typing import Tuple

import torch


class CallSignature:
    """Mixin of a prepared call class that sets _x_shape, _dtype, _memory_format, _out_shape and
    _valid (declared in its own __slots__)."""

    __slots__ = ()

    @property
    def x_shape(self) -> torch.Size:
        return self._x_shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def memory_format(self) -> torch.memory_format:
        """The dense layout of its input and output."""
        return self._memory_format

    @property
    def out_shape(self) -> Tuple[int, int, int, int]:
        return self._out_shape

    @property
    def valid(self) -> bool:
        """False once lwkernels.clear_cache() dropped it."""
        return self._valid
