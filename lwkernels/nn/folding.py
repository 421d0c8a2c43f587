"""BatchNorm (inference) and conv biases as the per-channel scale/shift pairs that the fused op
applies in its epilogues: BN(conv(x) + b) = scale * conv(x) + shift."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


def uses_running_stats(bn: Optional[nn.BatchNorm2d]) -> bool:
    """True when `bn` normalises with its running statistics (eval mode with tracked stats)."""
    return bn is None or (not bn.training and bn.running_mean is not None and bn.running_var is not None)


def fold_batchnorm(
    bn: Optional[nn.BatchNorm2d], conv_bias: Optional[torch.Tensor]
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(scale, shift) with BN(v + conv_bias) == scale * v + shift for an eval-mode BN; None = identity.

    Differentiable in the BN parameters and the bias, so gradients still reach them."""
    if bn is None:
        return None, conv_bias
    if not uses_running_stats(bn):
        raise ValueError("BatchNorm can only be folded in eval mode with running statistics")
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    scale = inv_std if bn.weight is None else bn.weight * inv_std
    mean = bn.running_mean if conv_bias is None else bn.running_mean - conv_bias
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift
