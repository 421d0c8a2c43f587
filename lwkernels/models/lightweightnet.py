"""LightweightNet — Sun et al., "Lightweight image classifier using dilated and depthwise separable
convolutions" (the seed network)."""
from __future__ import annotations

import torch
from torch import nn

from ..nn.block import JointBlock
from ..nn.chain import JointChain, classify
from .shapes import LIGHTWEIGHTNET_CONFIG
from ._common import ReferenceConvertible, scaled


class LightweightNet(ReferenceConvertible, nn.Module):
    """Nine dilated joint blocks, global average pooling and one fully connected layer.

    Configuration (docs/networks.md, LightweightNet; the block table is
    ``lwkernels.models.shapes.LIGHTWEIGHTNET_CONFIG``)::

        block  C_in -> C_out  stride   (output at 224 input)
          1      3  ->   32     2       112
          2     32  ->   64     1       112
          3     64  ->  128     2        56
          4    128  ->  256     2        28
          5    256  ->  512     2        14
          6    512  ->  512     1        14
          7    512  -> 1024     2         7
          8   1024  -> 1024     1         7
          9   1024  -> 1024     1         7
        AdaptiveAvgPool2d(1) -> Linear(int(1024 * alpha) -> num_classes)

    Every block is the paper's *joint module*, one :class:`~lwkernels.JointBlock`:
    dilated 3x3 depthwise conv (dilation = padding = ``dilation``) -> 1x1 pointwise conv -> BN ->
    ReLU, with no BN or activation between the two convs. Convs have no bias (BN follows). The
    blocks form one :class:`~lwkernels.JointChain` (``features``), so eager CPU inference runs them
    on the chain's own buffers.

    Paper facts reproduced: 29 layers (9 depthwise + 9 pointwise + 9 BN + pooling + FC; softmax is
    left to the loss), every depthwise kernel dilated (best delta = 3, the default; 1 = no
    dilation), width multiplier alpha (1, 0.75, 0.5) scaling every C_out as ``int(c * alpha)``
    (the 3 input channels are not scaled), any input resolution (the paper's 224/192/160 and
    CIFAR-10's native 32), and the parameter count: 3,109,157 at alpha = 1 with 10 classes (the
    paper's 3.1 M; 1,758,565 at alpha = 0.75, 790,181 at 0.5).

    Args:
        num_classes: outputs of the final Linear layer (10 for CIFAR-10).
        width_mult: alpha.
        dilation: the paper's dilated rate delta (PyTorch meaning: 1 = dense).
        in_channels: image channels (3).
        activation: the blocks' activation ("relu" in the paper, or "relu6").
    """

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, dilation: int = 3,
                 in_channels: int = 3, activation: str = "relu") -> None:
        super().__init__()
        self.config = dict(num_classes=num_classes, width_mult=width_mult, dilation=dilation,
                           in_channels=in_channels, activation=activation)
        blocks = []
        c_prev = in_channels
        for _, c_out, stride in LIGHTWEIGHTNET_CONFIG:
            c_out = scaled(c_out, width_mult)
            blocks.append(JointBlock(c_prev, c_out, stride=stride, dilation=dilation, activation=activation))
            c_prev = c_out
        self.features = JointChain(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return classify(self.features, x, self.pool, None, self.classifier)
