"""MobileNet-V1 (Howard et al., 2017), the baseline the seed papers compare against."""
from __future__ import annotations

import torch
from torch import nn

from ..nn.block import JointBlock
from ..nn.chain import JointChain, classify
from ..nn.conv_bn_act import ConvBNAct
from ._common import ReferenceConvertible, scaled

#: (C_out, stride) of the 13 depthwise-separable blocks after the 32-channel stem (alpha = 1).
MOBILENET_V1_BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


class MobileNetV1(ReferenceConvertible, nn.Module):
    """MobileNet-V1: 3x3 conv stem (32 channels, stride 2) -> BN -> ReLU (a
    :class:`~lwkernels.ConvBNAct`), then 13 blocks of
    ``DW 3x3 -> BN -> ReLU -> PW 1x1 -> BN -> ReLU`` — each one ``JointBlock(mid_norm=True)`` —
    then global average pooling and a fully connected layer (docs/networks.md, MobileNetV1). The 13
    blocks form one :class:`~lwkernels.JointChain` (``features``).

    Reproduces the paper's table (channel widths and strides in ``MOBILENET_V1_BLOCKS``; 224 input
    gives a 7x7x1024 final map) and its size: 4,231,976 parameters at alpha = 1 with 1000 classes
    (the paper's 4.2 M). The width multiplier scales every channel count as ``int(c * alpha)``.
    ``dilation`` (default 1, the original) dilates every depthwise conv, for comparisons with the
    dilated seed network.
    """

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, dilation: int = 1,
                 in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = dict(width_mult=width_mult, num_classes=num_classes, dilation=dilation,
                           in_channels=in_channels, dropout=dropout)
        c_prev = scaled(32, width_mult)
        self.stem = ConvBNAct(in_channels, c_prev, 3, stride=2, padding=1)
        blocks = []
        for c_out, stride in MOBILENET_V1_BLOCKS:
            c_out = scaled(c_out, width_mult)
            blocks.append(JointBlock(c_prev, c_out, stride=stride, dilation=dilation, mid_norm=True))
            c_prev = c_out
        self.features = JointChain(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return classify(self.features, x, self.pool, self.dropout, self.classifier, stem=self.stem)
