"""The canonical joint-block shapes (docs/networks.md, Benchmark block shapes): the single source for
models, benchmarks and the `lwkernels bench` command."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple


def conv_out_size(size: int, kernel_size: int, stride: int, dilation: int) -> int:
    """Output size of a convolution padded to keep the size at stride 1 (dilation * (k - 1) // 2)."""
    pad = dilation * (kernel_size - 1) // 2
    return (size + 2 * pad - dilation * (kernel_size - 1) - 1) // stride + 1


@dataclass(frozen=True)
class BlockShape:
    in_channels: int
    out_channels: int
    stride: int
    size: int  # input H = W
    dilation: int = 3
    kernel_size: int = 3

    @property
    def out_size(self) -> int:
        return conv_out_size(self.size, self.kernel_size, self.stride, self.dilation)

    @property
    def name(self) -> str:
        return f"{self.in_channels}->{self.out_channels} s{self.stride} {self.size}"

    def flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the depthwise and pointwise convs (BN/act are not counted)."""
        pixels = batch * self.out_size * self.out_size
        return 2 * pixels * self.in_channels * (self.kernel_size ** 2 + self.out_channels)

    def pointwise_flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the pointwise GEMM alone (pixels x C_in x C_out)."""
        return 2 * batch * self.out_size * self.out_size * self.in_channels * self.out_channels

    def bytes_moved(self, batch: int, itemsize: int = 4) -> int:
        """The fused block's compulsory traffic: read x and the weights, write y once."""
        x = batch * self.in_channels * self.size * self.size
        y = batch * self.out_channels * self.out_size * self.out_size
        w = self.in_channels * (self.kernel_size ** 2 + self.out_channels)
        return (x + y + w) * itemsize


#: The MobileNet-style joint blocks at 224 input, dilation 3 (docs/networks.md, Benchmark block shapes).
BENCHMARK_BLOCKS: Tuple[BlockShape, ...] = tuple(
    BlockShape(ci, co, s, hw)
    for ci, co, s, hw in [
        (32, 64, 1, 112), (64, 128, 2, 112), (128, 128, 1, 56), (128, 256, 2, 56), (256, 256, 1, 28),
        (256, 512, 2, 28), (512, 512, 1, 14), (512, 1024, 2, 14), (1024, 1024, 1, 7),
    ]
)

#: LightweightNet's nine joint blocks (C_in, C_out, stride) at width 1.0 (docs/networks.md, LightweightNet).
LIGHTWEIGHTNET_CONFIG: Tuple[Tuple[int, int, int], ...] = (
    (3, 32, 2), (32, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2),
    (512, 512, 1), (512, 1024, 2), (1024, 1024, 1), (1024, 1024, 1),
)


def lightweightnet_blocks(input_size: int = 224, dilation: int = 3) -> List[BlockShape]:
    """LightweightNet's nine blocks with their input sizes for a square input of `input_size`."""
    blocks, size = [], input_size
    for ci, co, s in LIGHTWEIGHTNET_CONFIG:
        block = BlockShape(ci, co, s, size, dilation)
        blocks.append(block)
        size = block.out_size
    return blocks


@dataclass(frozen=True)
class InvertedResidualShape:
    """An inverted residual: 1x1 expand to in_channels * expand_ratio, k x k depthwise, 1x1 project
    (the skip add where stride is 1 and the widths match)."""

    in_channels: int
    out_channels: int
    expand_ratio: int
    stride: int
    size: int  # input H = W
    dilation: int = 1
    kernel_size: int = 3

    @property
    def expanded(self) -> int:
        return self.in_channels * self.expand_ratio

    @property
    def out_size(self) -> int:
        return conv_out_size(self.size, self.kernel_size, self.stride, self.dilation)

    @property
    def name(self) -> str:
        d = f" d{self.dilation}" if self.dilation > 1 else ""
        return f"{self.in_channels}->{self.expanded}->{self.out_channels} s{self.stride}{d} {self.size}"

    def pointwise_flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the two 1x1 GEMMs."""
        return 2 * batch * self.expanded * (self.size ** 2 * self.in_channels + self.out_size ** 2 * self.out_channels)

    def flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the three convolutions (BN/act/add are not counted)."""
        return self.pointwise_flops(batch) + 2 * batch * self.out_size ** 2 * self.expanded * self.kernel_size ** 2


#: torchvision MobileNetV2's inverted residuals with an expand conv at 224 input (one of each shape),
#: and two dilated ones as DeepLabV3 runs its late blocks at output stride 8 (dilation 2 and 4 at 28).
INVERTED_RESIDUAL_BLOCKS: Tuple[InvertedResidualShape, ...] = tuple(
    InvertedResidualShape(*s) for s in [
        (16, 24, 6, 2, 112), (24, 24, 6, 1, 56), (24, 32, 6, 2, 56), (32, 32, 6, 1, 28), (32, 64, 6, 2, 28),
        (64, 64, 6, 1, 14), (64, 96, 6, 1, 14), (96, 96, 6, 1, 14), (96, 160, 6, 2, 14), (160, 160, 6, 1, 7),
        (160, 320, 6, 1, 7), (96, 96, 6, 1, 28, 2), (160, 160, 6, 1, 28, 4),
    ]
)
