"""The joint block in training mode: BatchNorm with batch statistics, fused, with its backward.

    c = depthwise_conv(x; stride, padding, dilation)
    t = mid_act(mid_bn(c + dw_bias))                 mid_bn: batch statistics (optional)
    z = pointwise_conv(t) + pw_bias
    y = out_act(bn(z) + residual)                    bn: batch statistics

Two ops, both ``torch.library.custom_op`` (so torch.compile(fullgraph=True) traces them), whose
arguments are the records of args.py (TrainArgs, TrainSaved):

``lwkernels::joint_block_train`` -> (y, z, mean, var, mid_mean, mid_var)
    The forward. mean/var are the biased batch statistics of z (mid_*: of c, empty without mid BN).
    CPU, float32/float64: cpu/training.py (the fused C++ kernel computes z and, in its epilogue,
    z's statistics; the depthwise intermediate never reaches memory). CUDA with Triton: the same
    fusion as Triton kernels (triton/training.py). Anything else: PyTorch ops
    (training_reference.py; correct, unfused).

``lwkernels::joint_block_train_backward``
    Its backward (registered with register_autograd). Saved: x, y and z (plus the parameters and the
    per-channel statistics); the depthwise output is recomputed from x. CPU: cpu/training.py (C++
    passes, PyTorch's BLAS for the two pointwise GEMMs). Elsewhere: training_reference.py, whose
    depthwise backward runs as Triton kernels on CUDA.

nn/training.py calls the forward from JointBlock and updates the running statistics exactly as
nn.BatchNorm2d does.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import training_reference
from .activation import NEEDS_INPUT_FOR_GRAD
from .args import GRAD_NAMES, TrainArgs, TrainOutputs, TrainSaved
from .contract import check_joint_args, output_memory_format
from ..cpu import training as cpu_training


def out_shape(x, dw_weight, pw_weight, residual, mid_act, out_act, stride, padding, dilation):
    """The output shape, after the inference op's argument checks (the training op's geometry and
    activations obey the same contract)."""
    return check_joint_args(x, dw_weight, None, None, mid_act, pw_weight, None, None, residual, out_act,
                            stride, padding, dilation)


def _out_shape_of(args: TrainArgs):
    return out_shape(args.x, args.dw_weight, args.pw_weight, args.residual, args.mid_act, args.out_act, args.stride,
                     args.padding, args.dilation)


@torch.library.custom_op("lwkernels::joint_block_train", mutates_args=())
def joint_block_train(
    x: Tensor,
    dw_weight: Tensor,
    dw_bias: Optional[Tensor],
    mid_weight: Optional[Tensor],
    mid_bias: Optional[Tensor],
    mid_bn: bool,
    mid_eps: float,
    mid_act: str,
    pw_weight: Tensor,
    pw_bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor],
    out_act: str,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training forward (batch statistics). Returns (y, z, mean, var, mid_mean, mid_var)."""
    args = TrainArgs(x, dw_weight, dw_bias, mid_weight, mid_bias, mid_bn, mid_eps, mid_act, pw_weight, pw_bias,
                     bn_weight, bn_bias, eps, residual, out_act, stride, padding, dilation)
    shape = _out_shape_of(args)
    if cpu_training.handles(x):
        return cpu_training.forward(args, shape)
    if x.device.type == "cuda":
        from ..triton import training as triton_training

        if triton_training.uses_triton_forward(x, shape):
            return triton_training.forward(args)
    return training_reference.forward(args)


@joint_block_train.register_fake
def _joint_block_train_fake(*inputs) -> TrainOutputs:
    args = TrainArgs(*inputs)
    shape = _out_shape_of(args)
    x = args.x
    fmt = output_memory_format(x)
    y = x.new_empty(shape).contiguous(memory_format=fmt)
    z = x.new_empty(shape).contiguous(memory_format=fmt)
    c_mid = x.shape[1] if args.mid_bn else 0
    return y, z, x.new_empty(shape[1]), x.new_empty(shape[1]), x.new_empty(c_mid), x.new_empty(c_mid)


# ---- backward ------------------------------------------------------------------------------------
@torch.library.custom_op("lwkernels::joint_block_train_backward", mutates_args=())
def joint_block_train_backward(
    grad_y: Tensor,
    x: Tensor,
    dw_weight: Tensor,
    dw_bias: Optional[Tensor],
    mid_weight: Optional[Tensor],
    mid_bias: Optional[Tensor],
    mid_mean: Tensor,
    mid_var: Tensor,
    mid_bn: bool,
    mid_eps: float,
    mid_act: str,
    pw_weight: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    residual: Optional[Tensor],
    y: Tensor,
    z: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    out_act: str,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    needs: List[bool],
) -> List[Tensor]:
    """Gradients of joint_block_train's y for the inputs flagged in `needs` (order: GRAD_NAMES);
    an empty tensor stands for each one not asked for (mid BatchNorm's when mid_bn is False)."""
    saved = TrainSaved(x, dw_weight, dw_bias, mid_weight, mid_bias, mid_mean, mid_var, mid_bn, mid_eps, mid_act,
                       pw_weight, bn_weight, bn_bias, residual, y, z, mean, var, eps, out_act, stride, padding,
                       dilation)
    needs = _effective_needs(needs, mid_bn)
    backend = cpu_training if cpu_training.handles(x) else training_reference
    grads = backend.backward(grad_y, saved, needs)
    return [g if (need and g is not None) else x.new_empty(0) for g, need in zip(grads, needs)]


def _effective_needs(needs: List[bool], mid_bn: bool) -> List[bool]:
    if len(needs) != len(GRAD_NAMES):
        raise ValueError(f"needs must have {len(GRAD_NAMES)} flags ({', '.join(GRAD_NAMES)})")
    return [bool(n) and (mid_bn or i not in (3, 4)) for i, n in enumerate(needs)]


@joint_block_train_backward.register_fake
def _joint_block_train_backward_fake(grad_y, *rest):
    saved, needs = TrainSaved(*rest[:-1]), rest[-1]
    x, z = saved.x, saved.z
    c_in, c_out = x.shape[1], z.shape[1]
    fmt = output_memory_format(x)
    needs = _effective_needs(needs, saved.mid_bn)
    shapes = [None, saved.dw_weight.shape, (c_in,), (c_in,), (c_in,), saved.pw_weight.shape, (c_out,), (c_out,),
              (c_out,), None]
    out = []
    for i, need in enumerate(needs):
        if not need:
            out.append(x.new_empty(0))
        elif i == 0:
            out.append(torch.empty_like(x, memory_format=fmt))
        elif i == 9:
            out.append(torch.empty_like(z))
        else:
            out.append(x.new_empty(shapes[i]))
    return out


# Input positions of joint_block_train that can take a gradient, in GRAD_NAMES order.
_GRAD_POS = tuple(TrainArgs._fields.index(name) for name in GRAD_NAMES)


def _setup_context(ctx, inputs, output):
    args = TrainArgs(*inputs)
    y, z, mean, var, mid_mean, mid_var = output
    needs_input = args.out_act in NEEDS_INPUT_FOR_GRAD  # then the backward recomputes bn(z) + residual
    ctx.save_for_backward(args.x, args.dw_weight, args.dw_bias, args.mid_weight, args.mid_bias, mid_mean, mid_var,
                          args.pw_weight, args.bn_weight, args.bn_bias if needs_input else None,
                          args.residual if needs_input else None, y, z, mean, var)
    ctx.args = (args.mid_bn, args.mid_eps, args.mid_act, args.eps, args.out_act, list(args.stride),
                list(args.padding), list(args.dilation))
    ctx.mark_non_differentiable(z, mean, var, mid_mean, mid_var)


def _backward(ctx, grad_y, *_unused):
    (x, dw_weight, dw_bias, mid_weight, mid_bias, mid_mean, mid_var, pw_weight, bn_weight, bn_bias, residual, y, z,
     mean, var) = ctx.saved_tensors
    mid_bn, mid_eps, mid_act, eps, out_act, stride, padding, dilation = ctx.args
    needs = [bool(ctx.needs_input_grad[i]) for i in _GRAD_POS]
    grads = [None] * len(TrainArgs._fields)
    if grad_y is None or not any(needs):
        return tuple(grads)
    result = joint_block_train_backward(grad_y, x, dw_weight, dw_bias, mid_weight, mid_bias, mid_mean, mid_var,
                                        mid_bn, mid_eps, mid_act, pw_weight, bn_weight, bn_bias, residual, y, z,
                                        mean, var, eps, out_act, stride, padding, dilation, needs)
    for pos, need, g in zip(_GRAD_POS, needs, result):
        grads[pos] = g if need else None
    return tuple(grads)


joint_block_train.register_autograd(_backward, setup_context=_setup_context)
