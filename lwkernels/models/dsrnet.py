"""DSRNet — "a lightweight feature extraction network" with depthwise-separable, dilated residual
blocks (docs/networks.md, DSRNet)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nn.block import JointBlock
from ._common import ReferenceConvertible, scaled

#: Within a stage, block i uses DILATION_CYCLE[i % 3]; a downsampling block uses DOWNSAMPLE_DILATION.
DILATION_CYCLE = (1, 2, 3)
DOWNSAMPLE_DILATION = 2


def dsrnet_dilation(index: int, stride: int) -> int:
    """The depthwise dilation of block `index` (0-based) within its stage (the reconstruction choice
    of docs/networks.md, DSRNet)."""
    return DOWNSAMPLE_DILATION if stride > 1 else DILATION_CYCLE[index % len(DILATION_CYCLE)]


class DSRBlock(nn.Module):
    """DSRNet's residual block: 1x1 conv (C_in -> width) -> BN -> ReLU, then the depthwise-separable
    conv (3x3 depthwise on ``width`` channels, dilated and strided; 1x1 pointwise width -> 4 x width)
    -> BN, plus the shortcut, -> ReLU.

    The second half is one :class:`~lwkernels.JointBlock` with a residual input:
    ``self.separable(h, residual=shortcut)`` computes ``relu(BN(PW(DW(h))) + shortcut)``. The shortcut
    is the identity, or a strided 1x1 conv + BN projection when the shape changes (ResNet option B).
    """

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1, expansion: int = 4) -> None:
        super().__init__()
        out_channels = width * expansion
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.separable = JointBlock(width, out_channels, stride=stride, dilation=dilation)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.separable(self.reduce(x), residual=self.shortcut(x))


class DSRNet(ReferenceConvertible, nn.Module):
    """DSRNet: a ResNet-50-like layout whose residual blocks replace the 3x3 + 1x1 pair by one
    dilated depthwise-separable conv (docs/networks.md, DSRNet).

    Configuration::

        stem     7x7 conv 3 -> 64, stride 2, dilation 3 (padding 9), BN, ReLU; 3x3 max pool, stride 2
        stage 1  3 x DSRBlock(width  64 -> 256)   stride 1
        stage 2  4 x DSRBlock(width 128 -> 512)   first block stride 2
        stage 3  6 x DSRBlock(width 256 -> 1024)  first block stride 2
        stage 4  3 x DSRBlock(width 512 -> 2048)  first block stride 2
        global average pool, FC 2048 -> num_classes

    (widths times ``width_mult``.) Depthwise dilations: within a stage block i uses 1, 2, 3, 1, ...
    (``DILATION_CYCLE``) and a downsampling block uses 2 (``dsrnet_dilation``, the reconstruction
    choice of docs/networks.md, DSRNet). Strides sit on the depthwise conv (and the projection shortcut).

    Paper facts reproduced: the stem (7x7, 64, stride 2, dilation 3) and max pool; stages of
    [3, 4, 6, 3] blocks with widths 64/128/256/512 and outputs 4 x width; each block a 1x1 conv
    followed by a depthwise-separable conv with BN and ReLU after the convs and an identity or
    projection shortcut; dilation 2 where feature maps are downsampled; global pooling and an FC.
    Not reproduced: the paper's 2.19e7 parameters — this reconstruction has 14.27 M with 1000
    classes (12.24 M with 10), as expected from removing the 3x3 convs of ResNet-50 (25.6 M); the
    paper's table does not say what else it counts.
    """

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, layers: Sequence[int] = (3, 4, 6, 3),
                 widths: Sequence[int] = (64, 128, 256, 512), expansion: int = 4, stem_channels: int = 64,
                 stem_dilation: int = 3, in_channels: int = 3, zero_init_residual: bool = False) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError("layers and widths must have the same length")
        self.config = dict(num_classes=num_classes, width_mult=width_mult, layers=tuple(layers), widths=tuple(widths),
                           expansion=expansion, stem_channels=stem_channels, stem_dilation=stem_dilation,
                           in_channels=in_channels, zero_init_residual=zero_init_residual)
        c_prev = scaled(stem_channels, width_mult)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c_prev, 7, stride=2, padding=3 * stem_dilation, dilation=stem_dilation, bias=False),
            nn.BatchNorm2d(c_prev),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = []
        for stage, (blocks, width) in enumerate(zip(layers, widths)):
            width = scaled(width, width_mult)
            stage_blocks = []
            for i in range(blocks):
                stride = 2 if (i == 0 and stage > 0) else 1
                stage_blocks.append(DSRBlock(c_prev, width, stride, dsrnet_dilation(i, stride), expansion))
                c_prev = width * expansion
            stages.append(nn.Sequential(*stage_blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)
        if zero_init_residual:  # each block starts as the identity (Goyal et al.)
            for m in self.modules():
                if isinstance(m, DSRBlock):
                    nn.init.zeros_(m.separable.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))
