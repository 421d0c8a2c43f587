"""InvertedResidual: MobileNetV2's block (expand 1x1 conv -> BN -> act -> depthwise k x k -> BN -> act
-> project 1x1 conv -> BN, + the input) as one module whose eager CPU inference is one native call
that never writes the expanded tensor whole (cpu/prepared_inverted_residual.py)."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..cpu.prepared_inverted_residual import PreparedInvertedResidual
from ..ops.activation import ActivationSpec, activation_name
from ..ops.inference import dispatcher_needed
from ..ops.inverted_residual import inverted_residual
from ..ops.reference import JointBlockReference
from .block import JointBlock
from .conv_bn_act import ConvBNAct
from .folding import fold_batchnorm, uses_running_stats


class InvertedResidualReference(nn.Module):
    """The plain composition InvertedResidual computes: ``expand`` (nn.Sequential(conv, bn, act)) at
    key ``0``, the depthwise -> project part (a JointBlockReference) at key ``1``, and the skip add.
    Same state_dict keys as InvertedResidual."""

    def __init__(self, expand: nn.Sequential, block: JointBlockReference, skip: bool) -> None:
        super().__init__()
        self.add_module("0", expand)
        self.add_module("1", block)
        self.skip = skip

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if residual is None and self.skip:
            residual = x
        return self._modules["1"](self._modules["0"](x), residual)


class InvertedResidual(nn.Sequential):
    """``nn.Sequential(expand, block)``: ``expand`` a :class:`ConvBNAct` with a 1x1 conv (stride 1, no
    padding), ``block`` a :class:`JointBlock` (depthwise -> mid BN -> act -> project 1x1 -> BN) over its
    output, plus the block input added at the end when ``skip`` (MobileNetV2 adds it when the stride is
    1 and the channel counts match) or a ``residual`` passed to forward.

    In eager CPU inference (BatchNorms in eval mode, nothing needing autograd, float32/float64, NCHW or
    channels_last) the whole block is one native call: each work item expands just the input rows its
    tile of outputs reads, in cache, and runs the depthwise and the projection on them, so the 6x-wide
    expanded tensor never goes to memory. With eval-mode BatchNorms, autograd, ``torch.compile`` and
    ``torch.export`` see one ``torch.ops.lwkernels.inverted_residual`` op (BatchNorms folded; its
    backward recomputes the expanded tensor). Training with batch statistics runs the two modules
    (ConvBNAct's plain modules, then the JointBlock's training op); ONNX export exports the plain
    composition. Results agree with the plain composition to float rounding (BatchNorm folded).

    ``InvertedResidual(32, 32, expand_ratio=6)`` builds the modules; ``from_modules(expand, block)``
    shares existing ones; ``to_reference()`` gives the plain composition with the same state_dict keys.
    """

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int = 6, stride: int = 1,
                 dilation: int = 1, kernel_size: int = 3, activation: ActivationSpec = "relu6",
                 skip: Optional[bool] = None, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 device=None, dtype=None) -> None:
        if not isinstance(expand_ratio, int) or expand_ratio < 1:
            raise ValueError(f"expand_ratio must be a positive int, got {expand_ratio!r}")
        hidden = in_channels * expand_ratio
        act = activation_name(activation)
        factory = {"eps": eps, "momentum": momentum, "device": device, "dtype": dtype}
        super().__init__(
            ConvBNAct(in_channels, hidden, 1, padding=0, activation=act, **factory),
            JointBlock(hidden, out_channels, stride=stride, dilation=dilation, kernel_size=kernel_size,
                       activation=None, mid_norm=True, mid_activation=act, **factory),
        )
        self.skip = (stride == 1 and in_channels == out_channels) if skip is None else bool(skip)
        self._check()

    @classmethod
    def from_modules(cls, expand: nn.Sequential, block: JointBlock, skip: bool = False) -> "InvertedResidual":
        """An InvertedResidual holding (not copying) ``expand`` (a ConvBNAct, or an nn.Sequential(conv,
        bn, act) that becomes one) and ``block``; ValueError if they do not chain."""
        if not isinstance(expand, ConvBNAct):
            if not isinstance(expand, nn.Sequential) or len(expand) != 3:
                raise ValueError("InvertedResidual: expand must be a ConvBNAct or nn.Sequential(conv, bn, act)")
            expand = ConvBNAct.from_modules(*expand)
        if not isinstance(block, JointBlock):
            raise ValueError("InvertedResidual: block must be a JointBlock")
        module = cls.__new__(cls)
        nn.Sequential.__init__(module, expand, block)
        module.skip = bool(skip)
        module._check()
        return module

    def _check(self) -> None:
        expand, block = self._modules["0"], self._modules["1"]
        conv = expand[0]
        if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or tuple(conv.padding) != (0, 0):
            raise ValueError("InvertedResidual: the expand conv must be 1x1 with stride 1 and no padding")
        if block.depthwise.in_channels != conv.out_channels:
            raise ValueError(f"InvertedResidual: the block takes {block.depthwise.in_channels} channels, "
                             f"the expand conv gives {conv.out_channels}")
        if self.skip and (block.pointwise.out_channels != conv.in_channels or tuple(block.depthwise.stride) != (1, 1)):
            raise ValueError("InvertedResidual: skip needs stride 1 and out_channels == in_channels")

    def to_reference(self) -> InvertedResidualReference:
        """The plain composition with a deep copy of the modules (same state_dict keys)."""
        expand, block = self._modules["0"], self._modules["1"]
        return InvertedResidualReference(nn.Sequential(*copy.deepcopy(list(expand))), block.to_reference(), self.skip)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if residual is None and self.skip:
            residual = x
        expand, block = self._modules["0"], self._modules["1"]
        # Eager inference replays the fused call (its matches() checks everything that could
        # forbid it, exports and compilers included, once per call).
        prepared = self.__dict__.get("_prepared")
        if prepared is not None and prepared.matches(expand, block, x, residual):
            return prepared.run(x, residual)
        if torch.onnx.is_in_onnx_export():  # both exporters translate the plain composition to standard ops
            return block(expand(x), residual)
        if not dispatcher_needed() and not (torch.is_grad_enabled() and self._needs_grad(x, residual)):
            # Eager inference without a fused call to replay: run the two modules (which prepare
            # their own calls) and prepare it from theirs.
            y = block(expand(x), residual)
            self.__dict__["_prepared"] = PreparedInvertedResidual.prepare(expand, block, x, residual)
            return y
        conv, bn, act = (expand._modules[k] for k in ("0", "1", "2"))
        if not (uses_running_stats(bn) and uses_running_stats(block.bn) and uses_running_stats(block.mid_bn)):
            return block(expand(x), residual)  # batch statistics: the modules' training paths
        # Autograd, torch.compile, torch.export: one lwkernels::inverted_residual op.
        dw, pw = block.depthwise, block.pointwise
        expand_scale, expand_shift = fold_batchnorm(bn, conv.bias)
        folded = block._folded_epilogues(dw, pw, block.bn, block.mid_bn)
        return inverted_residual(x, conv.weight, expand_scale, expand_shift, activation_name(act), dw.weight,
                                 folded[0], folded[1], activation_name(block.mid_act), pw.weight, folded[2], folded[3],
                                 residual, activation_name(block.act), list(dw.stride), list(dw.padding),
                                 list(dw.dilation))

    def _needs_grad(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
        return x.requires_grad or (residual is not None and residual.requires_grad) or \
            any(p.requires_grad for p in self.parameters())

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_prepared", None)
        return state
