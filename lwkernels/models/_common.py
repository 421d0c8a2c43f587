"""Small helpers shared by the model zoo."""
from __future__ import annotations

from torch import nn


def scaled(channels: int, width_mult: float) -> int:
    """Width multiplier alpha applied to a channel count: ``int(c * alpha)`` (at least 1)."""
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult!r}")
    return max(1, int(channels * width_mult))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


class ReferenceConvertible:
    """Mixin: ``model.to_reference()`` returns a deep copy in which every JointBlock is the plain
    PyTorch composition (see :func:`lwkernels.to_reference`)."""

    def to_reference(self) -> nn.Module:
        from ..nn.fuse import to_reference

        return to_reference(self)
