"""InvertedResidual's eager CPU inference fast path: the expand ConvBNAct and the JointBlock after it
as one native call (csrc/inverted_residual.h), whose expanded tensor never goes to memory whole.

It is built from the two modules' own prepared calls (cpu/prepared_dense_conv.py for the 1x1 expand,
cpu/prepared_call.py for the block), taken after the modules have just run the input the normal way,
and replayed while both would replay: the same input signature (shape, dtype, dense layout, residual
or not), nothing they read changed, no forward hooks on the two modules or their children, nothing
that needs autograd or must see the ops. Anything else runs the two modules.
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch

from .backend import PACK_CACHE, address, fold_depthwise
from .outputs import new_output
from .prepared_call import PreparedCall, _dense_layout
from .prepared_dense_conv import PreparedDenseConv
from .state_watch import StateWatch

#: NCHW calls whose output has at most this many pixels (7 x 7), or this many for a depthwise of
#: 25 or more taps (14 x 14, 5 x 5), run channels-last inside the native call (the kernel transposes
#: the tensors to and from its scratch: transpose_io). There the NCHW depthwise runs along rows of a
#: few pixels and the NHWC kernels are 1.15-1.4x faster; at 14 x 14 with 3 x 3 taps NCHW is 5-8%
#: faster (docs/performance.md).
TRANSPOSE_MAX_PIXELS = 49
TRANSPOSE_MAX_PIXELS_LARGE_KERNEL = 196

#: Every live PreparedInvertedResidual, so that lwkernels.clear_cache() can drop them.
_LIVE: "weakref.WeakSet[PreparedInvertedResidual]" = weakref.WeakSet()


class PreparedInvertedResidual:
    """One (expand, block) pair's fused eval forward for one input signature; see the module docstring."""

    __slots__ = ("_expand_call", "_block_call", "_children", "_C", "_geometry", "_expand_operands",
                 "_project", "_folded", "_dw_addresses", "_acts", "_has_residual", "_valid", "__weakref__")

    @classmethod
    def prepare(cls, expand: torch.nn.Module, block: torch.nn.Module, x: torch.Tensor,
                residual: Optional[torch.Tensor]) -> "Optional[PreparedInvertedResidual]":
        """The fused call of `expand` then `block` for `x`, from the calls both modules prepared when
        they last ran; None when either could not prepare one or they do not chain (a strided or
        padded expand conv, different layouts)."""
        expand_call = expand.__dict__.get("_prepared")
        block_call = block.__dict__.get("_prepared")
        if not isinstance(expand_call, PreparedDenseConv) or not isinstance(block_call, PreparedCall):
            return None
        children = tuple(expand._modules.values())
        conv = children[0]
        if not expand_call.pointwise or tuple(conv.stride) != (1, 1) or tuple(conv.padding) != (0, 0):
            return None
        if not expand_call.matches(children, x) or not block_call.state_unchanged() \
                or block_call.x_shape != expand_call.out_shape or block_call.dtype != x.dtype \
                or block_call.memory_format != expand_call.memory_format \
                or block_call.has_residual != (residual is not None):
            return None
        call = cls.__new__(cls)
        call._init(expand_call, block_call, children, block)
        return call

    def _init(self, expand_call: PreparedDenseConv, block_call: PreparedCall, children, block) -> None:
        self._expand_call, self._block_call, self._children = expand_call, block_call, children
        self._C = expand_call.native
        n, c, h, w = expand_call.x_shape
        bg = block_call.geometry
        packed, _ones, scale, shift = expand_call.pointwise_operands
        project = block_call.packed
        nchw = block_call.memory_format != torch.channels_last
        out_px, taps = bg.out_h * bg.out_w, bg.kernel_h * bg.kernel_w
        limit = TRANSPOSE_MAX_PIXELS_LARGE_KERNEL if taps >= 25 else TRANSPOSE_MAX_PIXELS
        transpose = nchw and out_px <= limit and expand_call.dtype == torch.float32
        if transpose:  # (packed for NHWC; the state watches see every change to these weights)
            packed = PACK_CACHE.get(children[0].weight, packed.isa, "nhwc")
            project = PACK_CACHE.get(block.pointwise.weight, project.isa, "nhwc")
        layout = "nchw" if nchw and not transpose else "nhwc"
        self._geometry = self._C.InvertedResidualGeometry(
            batch=n, in_channels=c, in_h=h, in_w=w, expanded_channels=bg.in_channels, out_channels=bg.out_channels,
            out_h=bg.out_h, out_w=bg.out_w, kernel_h=bg.kernel_h, kernel_w=bg.kernel_w, stride_h=bg.stride_h,
            stride_w=bg.stride_w, pad_h=bg.pad_h, pad_w=bg.pad_w, dil_h=bg.dil_h, dil_w=bg.dil_w,
            layout=layout, transpose_io=transpose)
        self._expand_operands = (packed, address(scale), address(shift))
        # run()'s depthwise operands, folded once for the layout its kernels run in.
        self._folded = fold_depthwise(self._C, layout, *block_call.depthwise_operands)
        self._dw_addresses = (address(self._folded[0]), 0, address(self._folded[1]))
        self._project = project
        self._acts = (expand_call.activation,) + block_call.activations
        self._has_residual = block_call.has_residual
        self._valid = True
        _LIVE.add(self)

    def matches(self, expand: torch.nn.Module, block: torch.nn.Module, x: torch.Tensor,
                residual: Optional[torch.Tensor]) -> bool:
        """True when replaying gives exactly what running the two modules would."""
        if not self._valid or expand._forward_hooks or expand._forward_pre_hooks or block._forward_hooks \
                or block._forward_pre_hooks or expand.__dict__.get("_prepared") is not self._expand_call \
                or block.__dict__.get("_prepared") is not self._block_call:
            return False
        # (expand_call.matches also checks for autograd on x and the expand's parameters, for
        # compilers, tracers and modes, and the ISA setting.)
        if not self._expand_call.matches(self._children, x) or not self._block_call.state_unchanged_here():
            return False
        if torch.is_grad_enabled() and self._block_call.parameters_require_grad():
            return False
        if residual is None:
            return not self._has_residual
        out_shape = self._block_call.out_shape
        return self._has_residual and type(residual) is torch.Tensor and residual.shape == out_shape \
            and residual.dtype == x.dtype and residual.is_cpu \
            and _dense_layout(residual, self._block_call.memory_format) \
            and not (torch.is_grad_enabled() and residual.requires_grad)

    def run(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        bc = self._block_call
        y = new_output(self._C, bc.out_shape, x.dtype, bc.memory_format)
        packed, e_scale, e_shift = self._expand_operands
        a, dw = bc.addresses, self._dw_addresses
        # (dw_folded by position: see PreparedCall.run_into)
        self._C.inverted_residual_forward(
            packed, self._project, self._geometry, x.data_ptr(), e_scale, e_shift, self._acts[0], dw[0], dw[1], dw[2],
            self._acts[1], a[3], a[4], address(residual), self._acts[2], y.data_ptr(), torch.get_num_threads(), True)
        return y

    def append_to(self, sequence, x: int, residual: int, y: int, transposed: bool = False) -> None:
        """Adds this call to a native CallSequence, as PreparedCall.append_to."""
        packed, e_scale, e_shift = self._expand_operands
        a = self._block_call.addresses
        sequence.add_inverted_residual(packed, self._project, self._geometry, e_scale, e_shift, self._acts[0], a[0],
                                       a[1], a[2], self._acts[1], a[3], a[4], self._acts[2], x, residual, y,
                                       y_transposed=transposed)

    @property
    def writes_transposed_alike(self) -> bool:
        """As PreparedCall's, except for NCHW tensors through the NHWC kernels (transposes)."""
        return not self.transposes

    def replay_state(self) -> Tuple[Tuple[StateWatch, ...], Optional[str]]:
        """As PreparedCall.replay_state (cpu/prepared_call.py)."""
        expand_watches, expand_isa = self._expand_call.replay_state()
        block_watches, block_isa = self._block_call.replay_state()
        # (two different settings match no current one, so such a call is never replayed blind)
        return expand_watches + block_watches, expand_isa if expand_isa == block_isa else "mixed settings"

    @property
    def x_shape(self) -> torch.Size:
        return self._expand_call.x_shape

    @property
    def dtype(self) -> torch.dtype:
        return self._expand_call.dtype

    @property
    def memory_format(self) -> torch.memory_format:
        return self._block_call.memory_format

    @property
    def out_shape(self):
        return self._block_call.out_shape

    @property
    def has_residual(self) -> bool:
        return self._has_residual

    @property
    def transposes(self) -> bool:
        """NCHW tensors run through the NHWC kernels (see TRANSPOSE_MAX_PIXELS)."""
        return self._geometry.transpose_io

    def invalidate(self) -> None:
        self._valid = False


def invalidate_all() -> None:
    """Make every prepared inverted residual prepare again (lwkernels.clear_cache())."""
    for call in list(_LIVE):
        call.invalidate()

