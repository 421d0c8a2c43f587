"""The training op (lwkernels::joint_block_train and its backward) in PyTorch ops: any device and
dtype. It runs where no fused kernel does (CUDA without Triton, empty batches, dtypes without a
kernel), supplies the CUDA path's normalisation and backward around its Triton kernels, and is what
the fused paths are tested against."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .activation import NEEDS_INPUT_FOR_GRAD, activation_backward, apply_activation
from .args import TrainArgs, TrainOutputs, TrainSaved
from .batch_norm import (STATS, bn_backward_coefficients, bn_scale_shift, elementwise_dtype, per_channel,
                         with_bias_nan)
from .contract import output_memory_format


def out_activation_input(saved: TrainSaved) -> Optional[Tensor]:
    """bn(z) + residual, recomputed where out_act's gradient needs its input (else None)."""
    if saved.out_act not in NEEDS_INPUT_FOR_GRAD:
        return None
    return _bn_plus_residual(saved.z, saved.mean, saved.var, saved.bn_weight, saved.bn_bias, saved.eps,
                             saved.residual)


def _affine(v: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """v * scale + shift per channel, in elementwise_dtype(v.dtype) (fp32 for fp16/bf16 v)."""
    dt = elementwise_dtype(v.dtype)
    return v.to(dt) * per_channel(scale.to(dt)) + per_channel(shift.to(dt))


def _bn_plus_residual(z, mean, var, bn_weight, bn_bias, eps, residual) -> Tensor:
    """bn(z) + residual with the batch statistics, in elementwise_dtype(z.dtype)."""
    v = _affine(z, *bn_scale_shift(mean, var, bn_weight, bn_bias, eps))
    return v if residual is None else v + residual.to(v.dtype)


def normalise(z, mean, var, bn_weight, bn_bias, eps, residual, out_act) -> Tensor:
    """out_act(bn(z) + residual) with the batch statistics (mean, var): computed in
    elementwise_dtype(z.dtype), returned in z's dtype (one rounding for fp16/bf16)."""
    return apply_activation(_bn_plus_residual(z, mean, var, bn_weight, bn_bias, eps, residual), out_act).to(z.dtype)


def forward(args: TrainArgs) -> TrainOutputs:
    """PyTorch ops: any device and dtype (CUDA tensors without Triton, fp64, empty batches)."""
    fmt = output_memory_format(args.x)
    c = F.conv2d(args.x, args.dw_weight, None, args.stride, args.padding, args.dilation, groups=args.x.shape[1])
    if args.mid_bn:
        mid_mean = c.mean(dim=(0, 2, 3))
        mid_var = with_bias_nan(c.var(dim=(0, 2, 3), unbiased=False), args.dw_bias)
        a = _affine(c, *bn_scale_shift(mid_mean, mid_var, args.mid_weight, args.mid_bias, args.mid_eps))
    else:
        mid_mean, mid_var = args.x.new_empty(0), args.x.new_empty(0)
        a = c if args.dw_bias is None else c + per_channel(args.dw_bias)
    z = F.conv2d(apply_activation(a, args.mid_act).to(c.dtype), args.pw_weight, args.pw_bias)
    mean = z.mean(dim=(0, 2, 3))
    var = z.var(dim=(0, 2, 3), unbiased=False)
    y = normalise(z, mean, var, args.bn_weight, args.bn_bias, args.eps, args.residual, args.out_act)
    return (y.contiguous(memory_format=fmt), z.contiguous(memory_format=fmt), mean, var,
            mid_mean.contiguous(), mid_var.contiguous())


def backward(grad_y: Tensor, saved: TrainSaved, needs: List[bool], triton_depthwise: Optional[bool] = None):
    """The same backward in PyTorch ops (any device; the CUDA slot), except the depthwise backward
    (grad x and grad dw_weight), which runs as Triton kernels on CUDA (triton_depthwise: None = when
    triton.training.uses_triton_backward says so; True forces them, as the interpreter tests do on
    CPU tensors)."""
    n, c_in = saved.x.shape[:2]
    c_out, oh, ow = saved.z.shape[1:]
    count = n * oh * ow
    dims = (0, 2, 3)
    gb = activation_backward(grad_y, saved.y, saved.out_act, out_activation_input(saved))
    dt, et = saved.z.dtype, elementwise_dtype(saved.z.dtype)  # elementwise math in et, one rounding to dt
    zc = saved.z.to(et) - per_channel(saved.mean.to(et))
    gb_e = gb.to(et)
    sum_g = gb.sum(dims, dtype=STATS)
    sum_gz = (gb_e * zc).sum(dims, dtype=STATS)
    A, B, invstd = bn_backward_coefficients(sum_g, sum_gz, saved.var, saved.bn_weight, saved.eps, count)
    gz = (per_channel(A.to(et)) * (gb_e - per_channel((sum_g / count).to(et)))
          + per_channel(B.to(et)) * zc).to(dt)
    grads: List[Optional[Tensor]] = [None] * 10
    grads[6] = gz.sum(dims) if needs[6] else None  # zero up to rounding and NaN, as autograd has it
    grads[7] = (sum_gz * invstd).to(saved.x.dtype) if needs[7] else None
    grads[8] = sum_g.to(saved.x.dtype) if needs[8] else None
    grads[9] = gb if needs[9] else None
    if not any(needs[:6]):
        return grads
    c = F.conv2d(saved.x, saved.dw_weight, None, saved.stride, saved.padding, saved.dilation, groups=c_in)
    if saved.mid_bn:
        a = _affine(c, *bn_scale_shift(saved.mid_mean, saved.mid_var, saved.mid_weight, saved.mid_bias,
                                       saved.mid_eps))
    else:
        a = c if saved.dw_bias is None else c + per_channel(saved.dw_bias)
    t = apply_activation(a, saved.mid_act).to(c.dtype)
    g_t, g_pw_w, _ = torch.ops.aten.convolution_backward(
        gz, t, saved.pw_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, needs[5], False])
    grads[5] = g_pw_w
    ga = activation_backward(g_t, t, saved.mid_act, a)
    if saved.mid_bn:
        cc = c.to(et) - per_channel(saved.mid_mean.to(et))
        ga_e = ga.to(et)
        s1 = ga.sum(dims, dtype=STATS)
        s2 = (ga_e * cc).sum(dims, dtype=STATS)
        A2, B2, invstd2 = bn_backward_coefficients(s1, s2, saved.mid_var, saved.mid_weight, saved.mid_eps, count)
        gc = (per_channel(A2.to(et)) * (ga_e - per_channel((s1 / count).to(et)))
              + per_channel(B2.to(et)) * cc).to(c.dtype)
        grads[3] = (s2 * invstd2).to(saved.x.dtype) if needs[3] else None
        grads[4] = s1.to(saved.x.dtype) if needs[4] else None
        grads[2] = gc.sum(dims) if needs[2] else None  # cancels in mid BN up to rounding and NaN
    else:
        gc = ga
        grads[2] = ga.sum(dims) if needs[2] else None
    if needs[0] or needs[1]:
        if triton_depthwise is None:
            from ..triton.training import uses_triton_backward

            triton_depthwise = uses_triton_backward(saved.x)
        if triton_depthwise:
            from ..triton.dw_backward import depthwise_backward_triton

            g_x, g_dw = depthwise_backward_triton(gc, saved.x, saved.dw_weight, saved.stride, saved.padding,
                                                  saved.dilation, needs[0], needs[1])
        else:
            g_x, g_dw, _ = torch.ops.aten.convolution_backward(
                gc, saved.x, saved.dw_weight, None, saved.stride, saved.padding, saved.dilation, False, [0, 0], c_in,
                [needs[0], needs[1], False])
        grads[0], grads[1] = g_x, g_dw
    return grads
