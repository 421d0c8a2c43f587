"""ConvBNAct's eager CPU inference fast path, prepared once per input signature and replayed:

- a k x k convolution over few channels (the image stem): the dense convolution kernel
  (csrc/dense_conv.h) with BatchNorm folded into its weights, on dense NCHW input. PyTorch runs it
  through a library that reorders the image and allocates on every call: 1.1 ms for a 224 image on
  two cores and 7-8 ms at batch 8 on the Xeon of docs/performance.md, 7x the native kernel;
- a 1x1 convolution (any width: the expand convolution of inverted residuals): the joint block's
  kernel with a 1x1 identity depthwise, i.e. its packed GEMM and epilogue (BatchNorm as the
  per-channel scale and shift, the activation), on NCHW or channels_last input. 1.4-22x PyTorch's
  1x1 convolution + BatchNorm + activation at MobileNetV2's expand shapes (docs/performance.md).

The prepared call is replayed while, as for a JointBlock's (cpu/prepared_call.py): the module's
children are the same objects with the same parameters, buffers (version counters) and settings,
none of them (nor any global hook) has forward hooks, BatchNorm uses its running statistics, the
input is a dense NCHW float32/float64 CPU tensor of the prepared shape, nothing needs autograd and
nothing needs to see the ops. Anything else runs the plain modules.
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

from ..nn.folding import fold_batchnorm, uses_running_stats
from ..ops.activation import activation_name
from ..ops.inference import dispatcher_needed
from ..ops.contract import conv_output_size, output_memory_format
from .call_signature import CallSignature
from .backend import NATIVE_DTYPES, PACK_CACHE, geometry_for, isa_env, native, selected_isa
from .prepared_call import _dense_layout
from .outputs import new_output
from .state_watch import StateWatch

#: What the prepared call reads, per child: (dict attribute, keys).
_STATE = (
    ("_parameters", ("weight", "bias")),
    ("_buffers", ("running_mean", "running_var")),
    ("__dict__", ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size", "eps",
                  "training", "track_running_stats")),
)


#: Every live PreparedDenseConv, so that lwkernels.clear_cache() can drop them.
_LIVE: "weakref.WeakSet[PreparedDenseConv]" = weakref.WeakSet()


def _hooked(children) -> bool:
    """Forward hooks on the children, or global ones: the plain modules must run to call them."""
    g = _module_globals
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks) or \
        any(m._forward_hooks or m._forward_pre_hooks for m in children)


def _layout_for(conv: nn.Conv2d, x: torch.Tensor) -> torch.memory_format:
    """The layout the call runs in: x's for a 1x1 convolution (the joint kernel has both), NCHW for
    the dense kernel (a channels_last x then goes to PyTorch)."""
    return output_memory_format(x) if is_pointwise(conv) else torch.contiguous_format


def is_pointwise(conv: nn.Conv2d) -> bool:
    """A 1x1 convolution: it runs on the joint block's GEMM (any width), not the dense kernel."""
    return tuple(conv.kernel_size) == (1, 1)


def eligible(conv: nn.Module, bn: nn.Module, act: nn.Module) -> Optional[str]:
    """None when (conv, bn, act) can run on a native kernel in eval mode, else why not."""
    if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros" \
            or isinstance(conv.padding, str):
        return "conv must be an nn.Conv2d with groups=1 and numeric zero padding"
    taps = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    if not is_pointwise(conv) and taps > native().DENSE_CONV_MAX_TAPS:
        return (f"a k x k convolution takes at most {native().DENSE_CONV_MAX_TAPS} in_channels x kernel taps, "
                f"got {taps} (1x1 convolutions take any width)")
    if type(bn) is not nn.BatchNorm2d:
        return "bn must be an nn.BatchNorm2d"
    try:
        activation_name(act)
    except ValueError as e:
        return str(e)
    return None


class PreparedDenseConv(CallSignature):
    """One ConvBNAct's fused eval forward for one input signature; see the module docstring."""

    __slots__ = ("_children", "_watch", "_x_shape", "_dtype", "_memory_format", "_out_shape", "_isa",
                 "_isa_env", "_geometry", "_kernel", "_operands", "_act", "_C", "_pointwise", "_valid",
                 "__weakref__")

    @classmethod
    def prepare(cls, children: Tuple[nn.Module, nn.Module, nn.Module], x: torch.Tensor) -> "Optional[PreparedDenseConv]":
        conv, bn, act = children
        if eligible(conv, bn, act) is not None or not uses_running_stats(bn) or _hooked(children):
            return None  # (hooks: the replay would skip them; do not prepare a call on every call)
        if type(x) is not torch.Tensor or not x.is_cpu or x.dtype not in NATIVE_DTYPES or x.dim() != 4 \
                or not _dense_layout(x, _layout_for(conv, x)) or x.numel() == 0 or x.shape[1] != conv.in_channels \
                or x.dtype != conv.weight.dtype:  # (PyTorch refuses mixed dtypes: let it say so)
            return None
        call = cls.__new__(cls)
        return call if call._init(children, x) else None

    def _init(self, children, x) -> bool:
        conv, bn, act = children
        self._children = children
        self._watch = StateWatch()
        for module in (conv, bn):
            for attribute, keys in _STATE:
                d = getattr(module, attribute)
                if not self._watch.watch(d, [k for k in keys if k in d]):
                    return False
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        oh, ow = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
        self._x_shape, self._dtype = x.shape, x.dtype
        self._memory_format = _layout_for(conv, x)
        self._out_shape = (n, conv.out_channels, oh, ow)
        _C = native()
        self._C = _C
        self._act = activation_name(act)
        self._isa_env = isa_env()
        self._pointwise = is_pointwise(conv)
        if self._pointwise:
            return self._init_pointwise(conv, bn, x, (oh, ow))
        self._geometry = _C.DenseConvGeometry(
            batch=n, in_channels=c, in_h=h, in_w=w, out_channels=conv.out_channels, out_h=oh, out_w=ow,
            kernel_h=kh, kernel_w=kw, stride_h=sh, stride_w=sw, pad_h=ph, pad_w=pw, dil_h=dh, dil_w=dw)
        if oh < 1 or ow < 1 or self._geometry.validate():
            return False  # e.g. a kernel larger than the input: PyTorch's convolution says so
        self._kernel = _C.dense_conv_forward_f32 if x.dtype == torch.float32 else _C.dense_conv_forward_f64
        with torch.no_grad():
            scale, shift = fold_batchnorm(bn, conv.bias)
            weight = (conv.weight * scale.view(-1, 1, 1, 1)).to(x.dtype).contiguous()
            shift = shift.to(x.dtype).contiguous()
        self._operands = (weight, shift)  # kept alive: the kernel reads their addresses
        self._isa = selected_isa() if x.dtype == torch.float32 else "scalar"
        return self._ready()

    def _init_pointwise(self, conv, bn, x, out_hw) -> bool:
        """The joint kernel with a 1x1 identity depthwise: the pointwise weights packed as a block's
        (cached per version), BatchNorm (and the conv bias) as the epilogue's scale and shift."""
        if out_hw[0] < 1 or out_hw[1] < 1:
            return False
        layout = "nhwc" if self._memory_format == torch.channels_last else "nchw"
        n, c, h, w = x.shape
        self._geometry = geometry_for(self._C, tuple(x.shape), self._out_shape, (1, 1), tuple(conv.stride),
                                      tuple(conv.padding), (1, 1), layout)
        with torch.no_grad():
            scale, shift = fold_batchnorm(bn, conv.bias)
            ones = torch.ones(c, dtype=x.dtype)
            self._operands = (PACK_CACHE.get(conv.weight, selected_isa(), layout), ones,
                              scale.to(x.dtype).contiguous(), shift.to(x.dtype).contiguous())
        self._kernel = self._C.joint_forward
        return self._ready()

    def _ready(self) -> bool:
        self._valid = True
        _LIVE.add(self)
        return True

    def matches(self, children, x: torch.Tensor) -> bool:
        # (tracers and compilers first: comparing a traced x's shape warns that the trace may be wrong)
        if not self._valid or dispatcher_needed():
            return False
        if type(x) is not torch.Tensor or x.shape != self._x_shape or x.dtype != self._dtype \
                or not x.is_cpu or not _dense_layout(x, self._memory_format):
            return False
        if any(a is not b for a, b in zip(children, self._children)):
            return False
        if _hooked(self._children) or not self._watch.unchanged():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self._watch.requires_grad()):
            return False
        return isa_env() == self._isa_env

    def serves(self, children) -> bool:
        """True while `children` are the modules it was prepared from and none has hooks (a plan
        that replays it without calling the module checks this, the state watch and the input)."""
        return all(a is b for a, b in zip(children, self._children)) and not _hooked(self._children)

    def parameters_require_grad(self) -> bool:
        return self._watch.requires_grad()

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = new_output(self._C, self._out_shape, self._dtype, self._memory_format)
        if self._pointwise:
            packed, ones, scale, shift = self._operands
            self._kernel(packed, self._geometry, x.data_ptr(), ones.data_ptr(), 0, 0, "none", scale.data_ptr(),
                         shift.data_ptr(), 0, self._act, y.data_ptr(), torch.get_num_threads())
            return y
        weight, shift = self._operands
        self._kernel(self._geometry, x.data_ptr(), weight.data_ptr(), shift.data_ptr(), self._act, y.data_ptr(),
                     self._isa, torch.get_num_threads())
        return y

    def append_to(self, sequence, x: int, residual: int, y: int, transposed: bool = False) -> None:
        """Adds this call to a native CallSequence, as PreparedCall.append_to (no residual);
        `transposed` writes the output in the other layout, where writes_transposed_alike."""
        if transposed and not self.writes_transposed_alike:
            raise ValueError("this PreparedDenseConv cannot write the other layout with the same values")
        if self._pointwise:
            packed, ones, scale, shift = self._operands
            sequence.add_joint(packed, self._geometry, ones.data_ptr(), 0, 0, "none", scale.data_ptr(),
                               shift.data_ptr(), self._act, x, residual, y, y_transposed=transposed)
            return
        weight, shift = self._operands
        sequence.add_dense_conv(self._geometry, weight.data_ptr(), shift.data_ptr(), self._act, self._isa, x, y,
                                "nhwc" if transposed else "nchw")

    def replay_state(self) -> Tuple[Tuple[StateWatch, ...], Optional[str]]:
        """As PreparedCall.replay_state (cpu/prepared_call.py)."""
        return (self._watch,), self._isa_env

    @property
    def writes_transposed_alike(self) -> bool:
        """True when append_to(transposed=True) gives exactly this call's values in the other
        layout: a 1x1 convolution (the joint kernel, as PreparedCall's), or a k x k one (always
        NCHW, its own NHWC-output kernel) whose activation is applied in registers (none, relu,
        relu6; hardswish and silu may round differently in the kernels' scalar tails)."""
        return self._pointwise or self._act in ("none", "relu", "relu6")

    # What a call composed of this one (cpu/prepared_inverted_residual.py) reuses.
    @property
    def pointwise(self) -> bool:
        """A 1x1 convolution on the joint kernel (pointwise_operands holds its operands)."""
        return self._pointwise

    @property
    def pointwise_operands(self):
        """(packed weights, ones, scale, shift) of the 1x1 path."""
        return self._operands

    @property
    def native(self):
        return self._C

    @property
    def activation(self) -> str:
        return self._act

    def invalidate(self) -> None:
        self._valid = False


def invalidate_all() -> None:
    """Make every prepared dense convolution prepare again (lwkernels.clear_cache())."""
    for call in list(_LIVE):
        call.invalidate()
