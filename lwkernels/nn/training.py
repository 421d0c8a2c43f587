"""JointBlock's forward when its BatchNorms use batch statistics (training mode): one
lwkernels::joint_block_train call, then the running-statistics updates nn.BatchNorm2d would make
(momentum, momentum=None, num_batches_tracked, unbiased running_var)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.activation import activation_name
from ..ops.batch_norm import STATS
from ..ops.training import joint_block_train, out_shape


def uses_batch_stats(bn: Optional[nn.BatchNorm2d]) -> bool:
    """nn.BatchNorm2d normalises with batch statistics in training mode and whenever it tracks none."""
    return bn is not None and (bn.training or (bn.running_mean is None and bn.running_var is None))


def update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """What F.batch_norm does to the buffers in training mode (unbiased variance into running_var)."""
    if not (bn.training and bn.track_running_stats):
        return
    with torch.no_grad():
        factor = bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                factor = 1.0 / bn.num_batches_tracked.to(torch.float64)
        if factor is None:
            factor = 0.0
        if bn.running_mean is None:
            return
        unbiased = var.to(STATS) * (count / max(count - 1, 1))
        if isinstance(factor, Tensor):
            bn.running_mean.copy_(bn.running_mean * (1 - factor) + mean.to(STATS) * factor)
            bn.running_var.copy_(bn.running_var * (1 - factor) + unbiased * factor)
        else:
            bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def joint_block_training(block, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """JointBlock.forward when its BatchNorm layers use batch statistics (training mode)."""
    dw, pw, bn, mid_bn = block.depthwise, block.pointwise, block.bn, block.mid_bn
    out_h, out_w = out_shape(x, dw.weight, pw.weight, residual, "none", "none", list(dw.stride), list(dw.padding),
                              list(dw.dilation))[2:]
    count = x.shape[0] * out_h * out_w
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size([x.shape[0], pw.out_channels, out_h, out_w])}")
    mid_act = activation_name(block.mid_act)
    y, z, mean, var, mid_mean, mid_var = joint_block_train(
        x, dw.weight, dw.bias,
        None if mid_bn is None else mid_bn.weight, None if mid_bn is None else mid_bn.bias,
        mid_bn is not None, 1e-5 if mid_bn is None else float(mid_bn.eps), mid_act,
        pw.weight, pw.bias, bn.weight, bn.bias, float(bn.eps), residual, activation_name(block.act),
        list(dw.stride), list(dw.padding), list(dw.dilation),
    )
    update_running_stats(bn, mean, var, count)
    if mid_bn is not None:
        # mid BN normalises c + dw_bias: the bias shifts its mean, not its variance.
        update_running_stats(mid_bn, mid_mean if dw.bias is None else mid_mean + dw.bias.detach(), mid_var, count)
    return y
