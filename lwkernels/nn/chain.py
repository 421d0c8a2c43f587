"""JointChain: an nn.Sequential of JointBlocks that eager CPU inference runs as one prepared plan."""
from __future__ import annotations

import torch
from torch import nn

from ..cpu.prepared_chain import PreparedChain, inner_format, runs_channels_last
from ..ops.contract import output_memory_format
from .block import JointBlock


class JointChain(nn.Sequential):
    """``nn.Sequential(*blocks)`` for JointBlocks that follow each other, with a faster eager CPU path.

    Everything about it is nn.Sequential's: indexing, slicing, appending, state_dict keys
    (``"0.depthwise.weight"``, ...), training, autograd, ``torch.compile``, ``torch.export`` and ONNX
    export (each block as usual). In eager CPU inference (eval-mode BatchNorm, nothing requiring
    grad) it replays a plan prepared on the first call (cpu/prepared_chain.py): the blocks' prepared
    calls run back to back from one native call, on two work buffers instead of a fresh tensor per
    intermediate. In a chain of four or more float32 blocks with 16 or more input channels, those
    blocks run channels-last, whose kernels are faster, converting once on the way in and back to
    the input's memory format at the end; the first call converts the same way, so every call
    returns the same values. They equal the blocks called in turn up to rounding (the two layouts'
    kernels sum in different orders).

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
        fused = all(isinstance(b, JointBlock) and type(b).forward is JointBlock.forward for b in blocks)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not (fused and x.is_cpu and not needs_grad) or torch.compiler.is_compiling() or torch.jit.is_tracing():
            for block in blocks:
                x = block(x)
            return x
        # Eager CPU inference: each block in the layout the replay runs it in (inner_format), the
        # output in the caller's layout, so that the replay returns these very values.
        caller_format = output_memory_format(x)
        channels_last = runs_channels_last(blocks, x.dtype)
        y, out_shapes = x, []
        for block in blocks:
            want = inner_format(tuple(y.shape), channels_last, caller_format)
            if output_memory_format(y) != want:
                y = y.contiguous(memory_format=want)
            y = block(y)
            out_shapes.append(tuple(y.shape))
        y = y.contiguous(memory_format=caller_format)
        if not torch.is_grad_enabled():
            self.__dict__["_plan"] = PreparedChain.prepare(blocks, x, out_shapes)
        return y

    def __getstate__(self):
        # The plan holds native objects, raw addresses and buffers: never pickle or deep-copy it.
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_plan", None)
        return state

