"""The one definition of correct: the joint block as plain PyTorch operations.

Every kernel in lwkernels is tested against these functions (and they against nn.Conv2d /
nn.BatchNorm2d directly in tests/test_reference.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .activation import apply_activation


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, 1, 1)


def joint_block_reference(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_scale: Optional[torch.Tensor],
    dw_shift: Optional[torch.Tensor],
    mid_act: str,
    pw_weight: torch.Tensor,
    pw_scale: Optional[torch.Tensor],
    pw_shift: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    out_act: str,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """The fused op's semantics, composed from F.conv2d and elementwise ops.

    t = mid_act(dw_scale * depthwise_conv(x) + dw_shift)
    y = out_act(pw_scale * pointwise_conv(t) + pw_shift + residual)
    """
    t = F.conv2d(x, dw_weight, None, tuple(stride), tuple(padding), tuple(dilation), groups=x.shape[1])
    if dw_scale is not None:
        t = t * _per_channel(dw_scale)
    if dw_shift is not None:
        t = t + _per_channel(dw_shift)
    t = apply_activation(t, mid_act)
    y = F.conv2d(t, pw_weight)
    if pw_scale is not None:
        y = y * _per_channel(pw_scale)
    if pw_shift is not None:
        y = y + _per_channel(pw_shift)
    if residual is not None:
        y = y + residual
    return apply_activation(y, out_act)


class JointBlockReference(nn.Module):
    """The joint block as plain PyTorch modules — what JointBlock fuses, with the same submodule
    names (so state_dicts are interchangeable):

        depthwise (Conv2d, groups=C_in) -> [mid_bn -> mid_act] -> pointwise (1x1 Conv2d) -> bn
        -> (+ residual) -> act
    """

    def __init__(
        self,
        depthwise: nn.Conv2d,
        pointwise: nn.Conv2d,
        bn: nn.BatchNorm2d,
        act: nn.Module,
        mid_bn: Optional[nn.BatchNorm2d] = None,
        mid_act: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.depthwise = depthwise
        self.mid_bn = mid_bn
        self.mid_act = mid_act if mid_act is not None else nn.Identity()
        self.pointwise = pointwise
        self.bn = bn
        self.act = act

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = self.depthwise(x)
        if self.mid_bn is not None:
            t = self.mid_bn(t)
        y = self.bn(self.pointwise(self.mid_act(t)))
        if residual is not None:
            y = y + residual
        return self.act(y)
