"""The training op's CUDA path: which calls take the Triton kernels, and the forward built on them
(the backward is ops/training_reference.py's with the Triton depthwise backward). Triton is imported
only when these run."""
from __future__ import annotations

from torch import Tensor

from ..ops.args import TrainArgs, TrainOutputs
from ..ops.batch_norm import bn_scale_shift, with_bias_nan
from ..ops.contract import output_memory_format
from ..ops.training_reference import normalise


def uses_triton_backward(x: Tensor) -> bool:
    """CUDA tensors in a Triton kernel dtype (fp16/bf16/fp32), with Triton importable: the depthwise
    backward runs as Triton kernels (triton/dw_backward.py)."""
    if x.device.type != "cuda":
        return False
    from .backend import triton_available

    if not triton_available():
        return False
    from .joint_block import KERNEL_DTYPES

    return x.dtype in KERNEL_DTYPES


def uses_triton_forward(x: Tensor, out_shape) -> bool:
    """uses_triton_backward's conditions, and a non-empty output (an empty batch has no statistics
    to compute; PyTorch ops return its NaN means)."""
    return x.shape[0] * out_shape[2] * out_shape[3] > 0 and uses_triton_backward(x)


def forward(args: TrainArgs) -> TrainOutputs:
    """CUDA: mid statistics from a depthwise pass that stores nothing (Triton), then z and its batch
    statistics from the fused depthwise -> pointwise Triton kernel (the depthwise output never reaches
    memory; the statistics come from the kernel's epilogue). Normalise + residual + activation: PyTorch
    ops (one elementwise pass)."""
    from .backend import uses_tf32
    from .joint_block import depthwise_stats_triton, pointwise_stats_triton

    fmt = output_memory_format(args.x)
    if args.mid_bn:
        mid_mean, mid_var = depthwise_stats_triton(args.x, args.dw_weight, args.stride, args.padding, args.dilation)
        mid_var = with_bias_nan(mid_var, args.dw_bias)
        # The kernel reads the per-channel affine as fp32 (the bias before BN cancels).
        dw_scale, dw_shift = (v.float() for v in bn_scale_shift(mid_mean, mid_var, args.mid_weight, args.mid_bias,
                                                                args.mid_eps))
        mid_mean, mid_var = mid_mean.to(args.x.dtype), mid_var.to(args.x.dtype)
    else:
        dw_scale, dw_shift = None, args.dw_bias
        mid_mean, mid_var = args.x.new_empty(0), args.x.new_empty(0)
    z, mean, var = pointwise_stats_triton(args.x, args.dw_weight, dw_scale, dw_shift, args.mid_act, args.pw_weight,
                                          args.pw_bias, args.stride, args.padding, args.dilation,
                                          allow_tf32=uses_tf32(args.x))
    y = normalise(z, mean, var, args.bn_weight, args.bn_bias, args.eps, args.residual, args.out_act)
    return (y.contiguous(memory_format=fmt), z, mean.to(args.x.dtype), var.to(args.x.dtype), mid_mean, mid_var)
