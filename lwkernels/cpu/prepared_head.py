"""A classifier head — global average pooling, dropout, a linear layer — as one fused kernel call.

After a model's last block, PyTorch's pooling and linear layer are two small ops, but they run cold:
the blocks' kernels have just evicted the interpreter's and the dispatcher's code and data from the
caches, so the first ops after them took 0.1-0.2 ms at batch 1 against ~0.02 ms warm, 3-5% of a
MobileNet call (docs/performance.md). The head is itself a joint block: a depthwise convolution
whose kernel covers the whole H x W map with every weight 1 / (H * W) is the average pool, and the
pointwise convolution after it, with the linear layer's weight and its bias as the shift, is the
linear layer. So the head runs on the joint kernel, and a chain can bind it as the last call of its
native sequence (cpu/prepared_chain.py), where it reads the blocks' last output while it is in cache.

The average comes out as the sum of x / (H * W) rather than sum(x) / (H * W): within a few units in
the last place of PyTorch's pooling.

Replayed while the three modules are the ones it was prepared with (an nn.AdaptiveAvgPool2d to 1 x 1,
an nn.Dropout in eval mode or none, an nn.Linear), their settings and the linear layer's parameters
are unchanged (same objects, same versions), none has hooks, and LWKERNELS_CPU_ISA is unchanged:
the chain plan that binds it checks the modules' identity (modules()), its watch (replay_state()),
the input and autograd, as for the blocks' prepared calls.
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
from torch import nn

from ..ops.contract import output_memory_format
from .call_signature import CallSignature
from .backend import NATIVE_DTYPES, address, fold_depthwise, geometry_for, isa_env, native, pack_pointwise, \
    selected_isa
from .outputs import new_output
from .prepared_call import _dense_layout
from .state_watch import StateWatch

#: Every live PreparedHead, so that lwkernels.clear_cache() can drop them.
_LIVE: "weakref.WeakSet[PreparedHead]" = weakref.WeakSet()


def _pools_to_one(pool) -> bool:
    if type(pool) is not nn.AdaptiveAvgPool2d:
        return False
    size = pool.output_size  # an int, or a pair whose entries may be None (= the input's size)
    return size == 1 or (isinstance(size, (tuple, list)) and tuple(size) == (1, 1))


def head_modules_fit(pool, dropout, linear) -> bool:
    """True for the head this module fuses: average pooling to 1 x 1, no dropout or an eval-mode one,
    a linear layer, none of them with hooks."""
    if not _pools_to_one(pool) or type(linear) is not nn.Linear:
        return False
    inert_dropout = type(dropout) is nn.Identity or (type(dropout) is nn.Dropout and not dropout.training)
    if dropout is not None and not inert_dropout:
        return False
    return not any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in (pool, dropout, linear))


class PreparedHead(CallSignature):
    """The fused head for one input signature; see the module docstring."""

    __slots__ = ("_modules", "_watch", "_x_shape", "_dtype", "_memory_format", "_out_shape", "_isa_env",
                 "_C", "_packed", "_geometry", "_operands", "_addresses", "_folded", "_valid", "__weakref__")

    @classmethod
    def prepare(cls, pool, dropout, linear, x: torch.Tensor) -> "Optional[PreparedHead]":
        """The head for inputs like `x` (the last block's output, [N, C, H, W], dense); None when these
        modules or this input are not the head it fuses."""
        if not head_modules_fit(pool, dropout, linear) or type(x) is not torch.Tensor or x.dim() != 4 \
                or not x.is_cpu or x.dtype not in NATIVE_DTYPES or x.numel() == 0 \
                or x.shape[1] != linear.in_features or linear.weight.dtype != x.dtype:
            return None
        memory_format = output_memory_format(x)
        if not _dense_layout(x, memory_format):
            return None
        head = cls.__new__(cls)
        return head if head._init(pool, dropout, linear, x, memory_format) else None

    def _init(self, pool, dropout, linear, x, memory_format) -> bool:
        self._modules = (pool, dropout, linear)
        self._watch = StateWatch()
        watched = [pool.__dict__, linear._parameters] + ([] if dropout is None else [dropout.__dict__])
        keys = [("output_size",), ("weight", "bias")] + ([] if dropout is None else [("training", "p")])
        if not all(self._watch.watch(d, k) for d, k in zip(watched, keys)):
            return False
        for m in self._modules:
            if m is not None:
                self._watch.watch_class(m)
                self._watch.watch_empty(m._forward_hooks)
                self._watch.watch_empty(m._forward_pre_hooks)
        n, c, h, w = x.shape
        classes = linear.out_features
        self._x_shape, self._dtype, self._memory_format = x.shape, x.dtype, memory_format
        self._out_shape = (n, classes, 1, 1)
        self._isa_env = isa_env()
        layout = "nhwc" if memory_format == torch.channels_last else "nchw"
        _C = self._C = native()
        self._packed = pack_pointwise(linear.weight.detach().view(classes, c, 1, 1), selected_isa(), layout)
        self._geometry = geometry_for(_C, tuple(x.shape), self._out_shape, (h, w), (1, 1), (0, 0), (1, 1), layout)
        average = torch.full((c, 1, h, w), 1.0 / (h * w), dtype=x.dtype)
        bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self._operands = (average, bias)  # (alive while the addresses below are used)
        self._addresses = (address(average), address(bias))
        self._folded = fold_depthwise(_C, layout, average, None, None)
        self._valid = True
        _LIVE.add(self)
        return True

    def modules(self) -> Tuple:
        """(pool, dropout, linear) as prepared."""
        return self._modules

    def serves(self, modules: Tuple, x: torch.Tensor) -> bool:
        """True while it computes the head of `modules` (pool, dropout, linear) on `x` as prepared:
        the same modules, unchanged (its watch, LWKERNELS_CPU_ISA), and an input of its signature.
        (For a caller that runs it on its own; a native sequence that binds it checks the watch.)"""
        return self._valid and all(a is b for a, b in zip(modules, self._modules)) and x.shape == self._x_shape \
            and x.dtype == self._dtype and x.is_cpu and _dense_layout(x, self._memory_format) \
            and self._watch.unchanged() and isa_env() == self._isa_env

    def parameters_require_grad(self) -> bool:
        return self._watch.requires_grad()

    def replay_state(self) -> Tuple[Tuple[StateWatch, ...], Optional[str]]:
        """As PreparedCall.replay_state (cpu/prepared_call.py)."""
        return (self._watch,), self._isa_env

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The head's [N, classes] output for `x` (which matches())."""
        y = new_output(self._C, self._out_shape[:2], self._dtype, torch.contiguous_format)
        # (y_sum, y_sumsq and dw_folded by position: see PreparedCall.run_into)
        self._C.joint_forward(self._packed, self._geometry, x.data_ptr(), address(self._folded[0]), 0,
                              address(self._folded[1]), "none", 0, self._addresses[1], 0, "none", y.data_ptr(),
                              torch.get_num_threads(), 0, 0, True)
        return y

    def append_to(self, sequence, x: int, residual: int, y: int) -> None:
        """Adds this call to a native CallSequence, as PreparedCall.append_to does (no residual)."""
        sequence.add_joint(self._packed, self._geometry, self._addresses[0], 0, 0, "none", 0, self._addresses[1],
                           "none", x, sequence.NO_SLOT, y)

    def invalidate(self) -> None:
        self._valid = False


def invalidate_all() -> None:
    """Make every prepared head prepare again (lwkernels.clear_cache())."""
    for head in list(_LIVE):
        head.invalidate()
