"""fuse()'s pass for image stems: an nn.Sequential(Conv2d, BatchNorm2d, act) over the image (at most 4
input channels, a k x k kernel with k > 1) becomes a ConvBNAct holding the same modules, so its
eager CPU inference runs the native dense convolution. The state_dict keys do not change (ConvBNAct
is an nn.Sequential with the same children). Containers that override forward (whatever they
compute is theirs), 1x1 convolutions and wider inputs are left to PyTorch: the kernel is built for
the few-channel stem, where PyTorch's convolution is at its worst."""
from __future__ import annotations

from typing import List

from torch import fx, nn

from .conv_bn_act import ConvBNAct
from ..cpu.prepared_dense_conv import eligible

#: The widest input a stem may have (RGB, RGBA).
STEM_MAX_IN_CHANNELS = 4


def is_stem(module: nn.Module) -> bool:
    if not isinstance(module, nn.Sequential) or isinstance(module, ConvBNAct) \
            or type(module).forward is not nn.Sequential.forward or len(module) != 3:
        return False
    conv, bn, act = module
    if not isinstance(conv, nn.Conv2d) or conv.in_channels > STEM_MAX_IN_CHANNELS or conv.kernel_size == (1, 1):
        return False
    return eligible(conv, bn, act) is None


def convert_stems(model: nn.Module, found: List[str]) -> nn.Module:
    """Replaces every stem in `model` (or `model` itself) by a ConvBNAct; appends their paths to `found`."""
    def as_block(seq: nn.Sequential) -> ConvBNAct:
        block = ConvBNAct.from_modules(*seq)
        block.training = seq.training
        return block

    def visit(module: nn.Module, path: str) -> None:
        if isinstance(module, fx.GraphModule):
            return  # its graph may call a stem's modules one by one: swapping the container does nothing
        for name, child in list(module.named_children()):
            child_path = f"{path}.{name}" if path else name
            if is_stem(child):
                found.append(child_path)
                setattr(module, name, as_block(child))
            else:
                visit(child, child_path)

    if is_stem(model):
        found.append("")
        return as_block(model)
    visit(model, "")
    return model
