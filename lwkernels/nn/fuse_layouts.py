"""fuse()'s final step: every outermost plain nn.Sequential that holds lwkernels' fused blocks (inverted
residuals, JointBlocks, directly or inside its members) becomes a LayoutSequential with the same
members, so that the blocks run in the layout their kernels are fastest in (docs/fuse.md). The
container object stays the same (its class changes; LayoutSequential adds no state of its own
beyond a cache), so keys, indexing, identity and everything else stay nn.Sequential's, and
to_reference() turns it back into one."""
from __future__ import annotations

from typing import List

from torch import nn

from .block import JointBlock
from .inverted_residual import InvertedResidual
from .layout_sequential import LayoutSequential


def _holds_blocks(seq: nn.Sequential) -> bool:
    return any(isinstance(m, (InvertedResidual, JointBlock)) for m in seq.modules())


def _as_layout_sequential(seq: nn.Sequential) -> LayoutSequential:
    seq.__class__ = LayoutSequential
    return seq


def convert_layout_sequentials(model: nn.Module, converted: List[str], path: str = "") -> nn.Module:
    """`model` with its outermost plain nn.Sequential containers that hold fused blocks (the model
    itself too) swapped for LayoutSequentials; appends their paths to `converted`. Containers
    inside those stay as they are: the outer one already chooses their layout, and each level of
    LayoutSequential costs a few microseconds of Python per call."""
    if type(model) is nn.Sequential and _holds_blocks(model):
        converted.append(path)
        return _as_layout_sequential(model)
    for name, child in list(model.named_children()):
        new = convert_layout_sequentials(child, converted, f"{path}.{name}" if path else name)
        if new is not child:
            setattr(model, name, new)
    return model
