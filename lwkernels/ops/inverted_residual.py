"""The fused inverted-residual op, registered with torch.library as
``torch.ops.lwkernels.inverted_residual``:

    e = expand_act(expand_scale * pointwise_conv(x; expand_weight) + expand_shift)
    t = mid_act(dw_scale * depthwise_conv(e; stride, padding, dilation) + dw_shift)
    y = out_act(pw_scale * pointwise_conv(t; pw_weight) + pw_shift + residual)

i.e. a 1x1 expand step in front of lwkernels::joint_block (same argument conventions: BatchNorms and
biases as per-channel scale/shift vectors). CPU: one native call that never writes e whole
(cpu/inverted_residual_kernel.py); other devices: the reference composition. The fake implementation
lets torch.compile and torch.export trace through the op; its backward is
ops/inverted_residual_backward.py.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .activation import apply_activation
from .args import InvertedResidualArgs
from .contract import check_inverted_residual_args, empty_output, output_memory_format
from .reference import joint_block_reference
from ..cpu.inverted_residual_kernel import inverted_residual_cpu


def expand_reference(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], act: str) -> Tensor:
    """The expand step as plain PyTorch operations."""
    e = F.conv2d(x, weight)
    if scale is not None:
        e = e * scale.reshape(1, -1, 1, 1)
    if shift is not None:
        e = e + shift.reshape(1, -1, 1, 1)
    return apply_activation(e, act)


def inverted_residual_reference(*inputs) -> Tensor:
    """The op's semantics composed from F.conv2d and elementwise ops (its arguments, in its order)."""
    args = InvertedResidualArgs(*inputs)
    e = expand_reference(args.x, args.expand_weight, args.expand_scale, args.expand_shift, args.expand_act)
    return joint_block_reference(*args.joint(e))


@torch.library.custom_op("lwkernels::inverted_residual", mutates_args=())
def inverted_residual(
    x: Tensor,
    expand_weight: Tensor,
    expand_scale: Optional[Tensor],
    expand_shift: Optional[Tensor],
    expand_act: str,
    dw_weight: Tensor,
    dw_scale: Optional[Tensor],
    dw_shift: Optional[Tensor],
    mid_act: str,
    pw_weight: Tensor,
    pw_scale: Optional[Tensor],
    pw_shift: Optional[Tensor],
    residual: Optional[Tensor],
    out_act: str,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> Tensor:
    """Fused expand 1x1 conv -> affine -> act -> joint block. Devices without a fused kernel get the
    reference composition (correct, not fused)."""
    inputs = (x, expand_weight, expand_scale, expand_shift, expand_act, dw_weight, dw_scale, dw_shift, mid_act,
              pw_weight, pw_scale, pw_shift, residual, out_act, stride, padding, dilation)
    check_inverted_residual_args(*inputs)
    return inverted_residual_reference(*inputs).contiguous(memory_format=output_memory_format(x))


# The kernels below take exactly inverted_residual's arguments, in its order (args.InvertedResidualArgs).
@inverted_residual.register_kernel("cpu")
def _inverted_residual_cpu(*inputs):
    return inverted_residual_cpu(InvertedResidualArgs(*inputs), check_inverted_residual_args(*inputs))


@inverted_residual.register_fake
def _inverted_residual_fake(*inputs):
    return empty_output(inputs[0], check_inverted_residual_args(*inputs))
