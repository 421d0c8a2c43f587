"""ConvBNAct: Conv2d -> BatchNorm2d -> activation (image stems, 1x1 expand convs) with a native eager
CPU path."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..cpu.prepared_dense_conv import PreparedDenseConv, eligible
from ..ops.activation import ActivationSpec, activation_module, activation_name
from ..ops.inference import is_tracing


class ConvBNAct(nn.Sequential):
    """``nn.Sequential(conv, bn, act)`` — an ``nn.Conv2d`` with groups=1, an ``nn.BatchNorm2d`` and an
    activation ("relu", "relu6", "hardswish", "silu" or None) — whose eager CPU inference runs one
    native kernel with BatchNorm folded in (cpu/prepared_dense_conv.py):

    - a k x k conv over few channels (at most 64 input channels x kernel taps: the 3 x 3 x 3 image
      stem of mobile networks) on the dense-convolution kernel, for dense NCHW inputs;
    - a 1x1 conv of any width (the expand conv of inverted residuals) on the joint block's GEMM
      kernel, for NCHW and channels_last inputs.

    float32 and float64. Everything else (training, autograd, other devices and layouts,
    ``torch.compile``, ``torch.export``, ONNX export) is the plain modules; the state_dict is
    nn.Sequential's (keys ``0.weight``, ``1.running_mean``, ...). Results agree with the plain modules
    to float rounding (folding BatchNorm rounds differently).

    ``ConvBNAct(3, 32, 3, stride=2, padding=1)`` builds the modules; ``ConvBNAct.from_modules(conv,
    bn, act)`` shares existing ones.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, dilation: int = 1, activation: ActivationSpec = "relu",
                 bias: bool = False, eps: float = 1e-5, momentum: Optional[float] = 0.1, device=None,
                 dtype=None) -> None:
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias, **factory),
            nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory),
            activation_module(activation_name(activation)),
        )
        self._check()

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Optional[nn.Module] = None) -> "ConvBNAct":
        """A ConvBNAct holding (not copying) the given modules; ValueError if they do not fit."""
        block = cls.__new__(cls)
        nn.Sequential.__init__(block, conv, bn, act if act is not None else nn.Identity())
        block._check()
        return block

    def _check(self) -> None:
        reason = eligible(*self)
        if reason is not None:
            raise ValueError(f"ConvBNAct: {reason}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        children = tuple(self._modules.values())
        if len(children) == 3 and not (torch.compiler.is_compiling() or is_tracing()) \
                and not torch.onnx.is_in_onnx_export():
            prepared = self.__dict__.get("_prepared")
            if prepared is not None and prepared.matches(children, x):
                return prepared.run(x)
            if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in self.parameters())):
                prepared = PreparedDenseConv.prepare(children, x)
                self.__dict__["_prepared"] = prepared
                if prepared is not None and prepared.matches(children, x):
                    return prepared.run(x)
        return super().forward(x)

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_prepared", None)
        return state
