"""JointBlock: the depthwise-separable joint block as one drop-in nn.Module backed by the fused op."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..ops.activation import ActivationSpec, activation_module, activation_name
from .folding import fold_batchnorm, uses_running_stats
from ..ops.inference import call_joint_block, direct_call_allowed, is_tracing
from ..cpu.prepared_call import PreparedCall
from ..ops.reference import JointBlockReference
from .training import joint_block_training, uses_batch_stats


class JointBlock(JointBlockReference):
    """Dilated depthwise k x k conv -> [BN -> act] -> pointwise 1x1 conv -> BN -> [+ residual] -> act.

    The submodules are real ``nn.Conv2d`` / ``nn.BatchNorm2d`` (``depthwise``, ``mid_bn``,
    ``pointwise``, ``bn``), so initialisation, optimisers, ``.to()``, hooks on parameters and
    state_dicts work as usual; the state_dict is interchangeable with :class:`JointBlockReference`
    (``to_reference()`` / ``from_modules()`` convert without changing outputs).

    Args:
        in_channels, out_channels: C_in and C_out.
        stride: depthwise stride. dilation: PyTorch's meaning (1 = dense; the seed paper's delta).
        kernel_size: depthwise kernel (odd; 3 is the fast path).
        padding: default ``dilation * (kernel_size - 1) // 2``, which keeps H, W at stride 1.
        activation: output activation, "relu" (default), "relu6", "hardswish", "silu" or None (or the
            matching nn module).
        mid_norm: BatchNorm between depthwise and pointwise (MobileNet-V1 style); mid_activation
            then applies after it (default: same as ``activation``).
        bias: conv biases (folded into the epilogue; BN usually makes them redundant).

    Forward: ``block(x)`` or ``block(x, residual)`` (residual of the output's shape, added before the
    output activation). With BatchNorm in eval mode (running statistics) the whole block is one
    fused ``torch.ops.lwkernels.joint_block`` call with BN folded into per-channel scale/shift;
    gradients flow through it. Eager CPU inference prepares that call once and replays it while the
    input signature and everything the block reads stay the same (cpu/prepared_call.py). With batch statistics (training mode, or track_running_stats=False)
    it is one ``torch.ops.lwkernels.joint_block_train`` call (ops/training.py) with its own backward,
    updating running statistics exactly as nn.BatchNorm2d; the depthwise output is recomputed in
    backward rather than saved. A mid BatchNorm in a different mode from ``bn`` runs the reference
    composition.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        kernel_size: int = 3,
        padding: Optional[int] = None,
        activation: ActivationSpec = "relu",
        mid_norm: bool = False,
        mid_activation: ActivationSpec = "same",
        bias: bool = False,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("stride", stride),
                            ("dilation", dilation), ("kernel_size", kernel_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int or None, got {padding!r}")
        act = activation_name(activation)
        if mid_activation == "same":
            mid_activation = act if mid_norm else None
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            depthwise=nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding, dilation,
                                groups=in_channels, bias=bias, **factory),
            pointwise=nn.Conv2d(in_channels, out_channels, 1, bias=bias, **factory),
            bn=nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory),
            act=activation_module(act),
            mid_bn=nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum, **factory) if mid_norm else None,
            mid_act=activation_module(activation_name(mid_activation)),
        )

    # -- conversion ------------------------------------------------------------------------------
    @classmethod
    def from_modules(
        cls,
        depthwise: nn.Conv2d,
        pointwise: nn.Conv2d,
        bn: nn.BatchNorm2d,
        act: Optional[nn.Module] = None,
        mid_bn: Optional[nn.BatchNorm2d] = None,
        mid_act: Optional[nn.Module] = None,
    ) -> "JointBlock":
        """A JointBlock that shares (not copies) the given modules' parameters and buffers.

        Raises ValueError if they do not form a joint block (depthwise groups, 1x1 pointwise,
        matching channels, supported activations)."""
        check_joint_modules(depthwise, pointwise, bn, act, mid_bn, mid_act)
        block = cls.__new__(cls)
        JointBlockReference.__init__(block, depthwise, pointwise, bn,
                                     activation_module(activation_name(act)), mid_bn,
                                     activation_module(activation_name(mid_act)))
        return block

    def to_reference(self) -> JointBlockReference:
        """The plain PyTorch composition with a deep copy of this block's modules."""
        return JointBlockReference(*(copy.deepcopy(m) for m in (self.depthwise, self.pointwise, self.bn, self.act,
                                                                 self.mid_bn, self.mid_act)))

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not (torch.compiler.is_compiling() or is_tracing()):  # eager CPU inference: replay
            prepared = self.__dict__.get("_prepared")
            if prepared is not None and prepared.matches(self, x, residual):
                return prepared.run(x, residual)
        if torch.onnx.is_in_onnx_export():  # both exporters translate the plain composition to standard ops
            return super().forward(x, residual)
        bn, mid_bn = self.bn, self.mid_bn  # each nn.Module attribute lookup costs; fetch once
        if not (uses_running_stats(bn) and uses_running_stats(mid_bn)):
            if uses_batch_stats(bn) and (mid_bn is None or uses_batch_stats(mid_bn)) and x.shape[0] > 0:
                return joint_block_training(self, x, residual)
            return super().forward(x, residual)  # mixed BN modes or an empty batch: reference composition
        dw, pw = self.depthwise, self.pointwise
        folded = self._folded_epilogues(dw, pw, bn, mid_bn)
        args = (x, dw.weight, folded[0], folded[1], activation_name(self.mid_act), pw.weight, folded[2], folded[3],
                residual, activation_name(self.act), list(dw.stride), list(dw.padding), list(dw.dilation))
        y = call_joint_block(*args)
        if direct_call_allowed(args):  # the op accepted these arguments: prepare the next calls
            self.__dict__["_prepared"] = PreparedCall.prepare(self, x, residual, folded, tuple(y.shape))
        return y

    def __getstate__(self):
        # The per-call caches hold native objects and raw addresses: never pickle or deep-copy them.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.pop("_prepared", None)
        state.pop("_fold_cache", None)
        return state

    def _folded_epilogues(self, depthwise=None, pointwise=None, bn=None, mid_bn=None):
        """(dw_scale, dw_shift, pw_scale, pw_shift) of the eval-mode BNs and conv biases.

        Eager inference (grad off) reuses them until a tensor they come from changes (version
        counters; a handful of tiny ops saved per call). With grad on they are recomputed so that
        gradients reach the BN parameters; under torch.compile they are traced like any other op.
        forward passes the submodules it already fetched; other callers pass nothing."""
        if depthwise is None:
            depthwise, pointwise, bn, mid_bn = self.depthwise, self.pointwise, self.bn, self.mid_bn
        dw_bias, pw_bias = depthwise.bias, pointwise.bias
        bns = tuple(m for m in (mid_bn, bn) if m is not None)
        sources = (dw_bias, pw_bias) + tuple(
            t for m in bns for t in (m.weight, m.bias, m.running_mean, m.running_var))
        cacheable = (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                     and not any(t is not None and t.is_inference() for t in sources))
        if cacheable:
            key = tuple(None if t is None else (id(t), t._version) for t in sources) + tuple(m.eps for m in bns)
            cached = self.__dict__.get("_fold_cache")
            if cached is not None and cached[0] == key:
                return cached[1]
        folded = fold_batchnorm(mid_bn, dw_bias) + fold_batchnorm(bn, pw_bias)
        if cacheable:
            self.__dict__["_fold_cache"] = (key, folded)  # plain attribute: not state, not a buffer
        return folded

    def extra_repr(self) -> str:
        return "fused"


def check_joint_modules(depthwise, pointwise, bn, act=None, mid_bn=None, mid_act=None) -> None:
    """Raise ValueError naming the first reason these modules are not a fusable joint block."""
    if not isinstance(depthwise, nn.Conv2d) or depthwise.groups != depthwise.in_channels or \
            depthwise.out_channels != depthwise.in_channels:
        raise ValueError("depthwise must be an nn.Conv2d with groups == in_channels == out_channels")
    if depthwise.padding_mode != "zeros" or isinstance(depthwise.padding, str):
        raise ValueError("depthwise must use explicit zero padding (padding_mode='zeros', numeric padding)")
    if not isinstance(pointwise, nn.Conv2d) or pointwise.kernel_size != (1, 1) or pointwise.groups != 1 or \
            pointwise.stride != (1, 1) or pointwise.padding != (0, 0):
        raise ValueError("pointwise must be a 1x1 nn.Conv2d with stride 1, no padding and groups=1")
    if pointwise.in_channels != depthwise.out_channels:
        raise ValueError(f"pointwise expects {pointwise.in_channels} channels, depthwise gives {depthwise.out_channels}")
    if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != pointwise.out_channels:
        raise ValueError(f"bn must be an nn.BatchNorm2d over {pointwise.out_channels} channels")
    if mid_bn is not None and (not isinstance(mid_bn, nn.BatchNorm2d) or mid_bn.num_features != depthwise.out_channels):
        raise ValueError(f"mid_bn must be an nn.BatchNorm2d over {depthwise.out_channels} channels")
    activation_name(act)
    activation_name(mid_act)

