"""BatchNorm with batch statistics as per-channel arithmetic, shared by every backend of the training
op: statistics from sums, the normalisation as a scale and shift, and the coefficients of its input
gradient. Per-channel quantities are float64, as PyTorch accumulates them."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

STATS = torch.float64  # per-channel sums are accumulated in double


def elementwise_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype BatchNorm's per-element arithmetic runs in for tensors of `dtype`: fp32 for fp16/bf16
    (as PyTorch's own BatchNorm kernels compute, rounding once at the end; a chain of fp16 operations,
    such as z * scale + shift with large scale and shift, loses several units), else `dtype` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def per_channel(v: Tensor) -> Tensor:
    """A [C] vector shaped to broadcast over [N, C, H, W]."""
    return v.reshape(1, -1, 1, 1)


def mean_var(s: Tensor, ss: Tensor, count: int) -> Tuple[Tensor, Tensor]:
    """Biased batch mean and variance from the per-channel sum and sum of squares."""
    mean = s / count
    return mean, (ss / count - mean * mean).clamp_min(0)


def bn_scale_shift(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    """(scale, shift) with BN(v) = scale * v + shift for batch statistics (mean, var)."""
    scale = torch.rsqrt(var.to(STATS) + eps)
    if weight is not None:
        scale = scale * weight.to(STATS)
    shift = -mean.to(STATS) * scale
    if bias is not None:
        shift = shift + bias.to(STATS)
    return scale, shift


def with_bias_nan(mid_var: Tensor, dw_bias: Optional[Tensor]) -> Tensor:
    """mid BatchNorm's batch variance of c + dw_bias, from that of c: the bias cancels in BatchNorm,
    but a NaN bias still makes its channel's statistics (and so the channel) NaN in PyTorch."""
    return mid_var if dw_bias is None else mid_var + dw_bias.to(mid_var.dtype) * 0


def bn_backward_coefficients(sum_g, sum_gz, var, weight, eps, count):
    """BatchNorm (batch statistics) input gradient as gz = A * gb + B * z + K, from the per-channel
    sums of gb and gb * (z - mean): returns (A, B, invstd); K = -B * mean - A * sum_g / count."""
    invstd = torch.rsqrt(var.to(STATS) + eps)
    a = invstd if weight is None else weight.to(STATS) * invstd
    b = -a * invstd * invstd * sum_gz / count
    return a, b, invstd
