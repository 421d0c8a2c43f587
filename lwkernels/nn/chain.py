"""JointChain: an nn.Sequential of JointBlocks that eager CPU inference runs as one prepared plan."""
from __future__ import annotations

import torch
from torch import nn

from ..cpu.prepared_chain import PreparedChain
from .block import JointBlock


class JointChain(nn.Sequential):
    """``nn.Sequential(*blocks)`` for JointBlocks that follow each other, with a faster eager CPU path.

    Everything about it is nn.Sequential's: indexing, slicing, appending, state_dict keys
    (``"0.depthwise.weight"``, ...), training, autograd, ``torch.compile``, ``torch.export`` and ONNX
    export (each block as usual). In eager CPU inference (eval-mode BatchNorm, nothing requiring
    grad) it replays a plan prepared on the first call (cpu/prepared_chain.py): the blocks' prepared
    calls run back to back from one native call, on two work buffers instead of a fresh tensor per
    intermediate, in the input's memory layout. The output is the same tensor, in the same memory
    format, that calling the blocks in turn returns.

    The buffers (two of the largest intermediate's size) live as long as the plan: until the input
    signature changes, ``lwkernels.clear_cache()``, or the chain is freed. The fast path needs every
    module to be a :class:`~lwkernels.JointBlock` (a chain holding anything else, e.g. after
    ``to_reference(..., inplace=True)`` swapped its blocks, runs as a plain nn.Sequential).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self._modules.values())
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            plan = self.__dict__.get("_plan")
            if plan is not None and plan.matches(blocks, x):
                y = plan.run(x)
                if y is not None:
                    return y
        y, out_shapes = x, []
        for block in blocks:
            y = block(y)
            out_shapes.append(tuple(y.shape))
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()) and not torch.is_grad_enabled() \
                and all(isinstance(b, JointBlock) and type(b).forward is JointBlock.forward for b in blocks):
            self.__dict__["_plan"] = PreparedChain.prepare(blocks, x, out_shapes)
        return y

    def __getstate__(self):
        # The plan holds native objects, raw addresses and buffers: never pickle or deep-copy it.
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_plan", None)
        return state

