"""Multi-scale separable network — "An multi-scale learning network with depthwise separable
convolutions" (docs/networks.md, MultiScaleNet)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nn.block import JointBlock
from ._common import ReferenceConvertible, scaled

METHODS = ("concat", "add")


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when shapes agree, otherwise a strided 1x1 conv + BN (ResNet's projection shortcut)."""
    if in_channels == out_channels and stride == 1:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class MultiScaleUnit(nn.Module):
    """The multi-scale separable convolutional unit with its residual connection.

    Two branches of depthwise-separable 3x3 convolutions see the input at two scales: ``branch3``
    is one separable conv (3x3 receptive field), ``branch5`` two stacked ones (5x5 receptive
    field). Each branch's last pointwise conv extends the feature maps; the branches are merged

    - ``"concat"`` (the paper's method 1): each branch gives ``out_channels / 2`` maps, concatenated;
    - ``"add"`` (method 2): each branch gives ``out_channels`` maps, added element-wise;

    and the unit's shortcut (identity, or a strided 1x1 conv + BN when the shape changes) is added
    before the final ReLU: ``relu(merge(BN(PW(DW x)), BN(PW(DW(JB(x))))) + shortcut(x))``.

    Every separable conv is one JointBlock and the merge and shortcut ride on its residual input:
    for concat, each branch adds its half of the shortcut (``relu`` of a concatenation is the
    concatenation of ``relu`` s); for add, ``branch3`` (no activation) plus the shortcut is the
    residual of ``branch5``'s last block. Stride applies in the first separable conv of each branch.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, method: str = "concat",
                 dilation: int = 1) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        if method == "concat":
            self.split = out_channels // 2
            if self.split < 1:
                raise ValueError("concat needs out_channels >= 2")
            widths, act3 = (self.split, out_channels - self.split), "relu"
        else:
            self.split = out_channels
            widths, act3 = (out_channels, out_channels), None
        self.branch3 = JointBlock(in_channels, widths[0], stride=stride, dilation=dilation, activation=act3)
        self.branch5 = nn.Sequential(
            JointBlock(in_channels, in_channels, stride=stride, dilation=dilation),
            JointBlock(in_channels, widths[1], dilation=dilation),
        )
        self.shortcut = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        h = self.branch5[0](x)
        if self.method == "concat":
            y3 = self.branch3(x, residual=shortcut[:, : self.split])
            y5 = self.branch5[1](h, residual=shortcut[:, self.split:])
            return torch.cat([y3, y5], dim=1)
        return self.branch5[1](h, residual=self.branch3(x) + shortcut)


class MultiScaleNet(ReferenceConvertible, nn.Module):
    """Multi-scale separable network for small (e.g. 32 x 32) images (docs/networks.md, MultiScaleNet).

    Configuration (channel widths are not given in the paper; this is the documented choice)::

        input layer   3x3 conv 3 -> 32, BN, ReLU                      32 x 32
        unit 1        MultiScaleUnit(32  -> 64,  stride 1)            32 x 32
        unit 2        MultiScaleUnit(64  -> 128, stride 2)            16 x 16
        unit 3        MultiScaleUnit(128 -> 256, stride 2)             8 x  8
        global average pool, FC 256 -> 128, ReLU, FC 128 -> num_classes

    (channel counts times ``width_mult``; ``widths``/``strides`` choose 2 or 3 units, as the paper
    does for MNIST and CIFAR-10.) See :class:`MultiScaleUnit` for the unit.

    Paper facts reproduced: an input layer, three multi-scale units and two fully connected layers
    for 32 x 32 inputs; branches of one and of two stacked depthwise-separable 3x3 convs (3x3 and
    5x5 receptive fields) merged by concatenation (method 1, ``method="concat"``) or addition
    (method 2, ``method="add"``); pointwise convs extending the feature maps; residual connections
    around each unit. Every depthwise-separable conv is a JointBlock (9 in the default network).
    Parameters with 10 classes: 150,922 (concat) and 194,826 (add). A unit has 2.5x (concat) or
    3.4x (add) the parameters of a MobileNet unit with the same C_in -> C_out, its projection
    shortcut included (the paper: "about two times").
    """

    def __init__(self, method: str = "concat", num_classes: int = 10, width_mult: float = 1.0,
                 widths: Sequence[int] = (64, 128, 256), strides: Sequence[int] = (1, 2, 2),
                 stem_channels: int = 32, hidden: int = 128, dilation: int = 1, in_channels: int = 3) -> None:
        super().__init__()
        if len(widths) != len(strides) or not widths:
            raise ValueError("widths and strides must be non-empty and of equal length")
        self.config = dict(method=method, num_classes=num_classes, width_mult=width_mult, widths=tuple(widths),
                           strides=tuple(strides), stem_channels=stem_channels, hidden=hidden,
                           dilation=dilation, in_channels=in_channels)
        c_prev = scaled(stem_channels, width_mult)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c_prev, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_prev),
            nn.ReLU(inplace=True),
        )
        units = []
        for width, stride in zip(widths, strides):
            c_out = scaled(width, width_mult)
            units.append(MultiScaleUnit(c_prev, c_out, stride=stride, method=method, dilation=dilation))
            c_prev = c_out
        self.units = nn.Sequential(*units)
        self.pool = nn.AdaptiveAvgPool2d(1)
        c_hidden = scaled(hidden, width_mult)
        self.classifier = nn.Sequential(
            nn.Linear(c_prev, c_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(c_hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.units(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))
