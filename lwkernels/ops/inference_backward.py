"""Backward of the fused op (inference form: per-channel affine epilogues, no batch statistics).

The depthwise intermediate is not saved: backward recomputes it from x. The gradients use PyTorch
ops (aten.convolution_backward, the same kernels autograd uses for nn.Conv2d); fused backward
kernels are future work. Registered with torch.library.register_autograd, so it is
torch.compile-safe.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .activation import NEEDS_INPUT_FOR_GRAD, activation_backward, apply_activation
from ..cpu.backend import PACK_CACHE
from .inference import joint_block


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=(0, 2, 3))


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, 1, 1)


def _setup_context(ctx, inputs, output):
    (x, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, pw_scale, pw_shift, residual, out_act,
     stride, padding, dilation) = inputs
    # hardswish/silu gradients need the output activation's input, which needs the residual.
    keep_residual = residual if out_act in NEEDS_INPUT_FOR_GRAD else None
    ctx.save_for_backward(x, dw_weight, dw_scale, dw_shift, pw_weight, pw_scale, pw_shift, keep_residual, output)
    # A recorded call's weights may next be perturbed through `.data` (gradcheck does): keep no
    # packing of them that a version counter could not invalidate.
    PACK_CACHE.discard(pw_weight)
    ctx.acts = (mid_act, out_act)
    ctx.conv = (list(stride), list(padding), list(dilation))
    ctx.has_residual = residual is not None


def _backward(ctx, grad_y):
    return joint_block_backward(grad_y, ctx.saved_tensors, ctx.acts, ctx.conv, ctx.needs_input_grad)


def joint_block_backward(grad_y, saved, acts, conv, needs):
    """The gradients of joint_block's inputs (None where `needs` says not needed) from what
    _setup_context saves: (x, dw_weight, dw_scale, dw_shift, pw_weight, pw_scale, pw_shift,
    residual if the output activation needs it, y), acts = (mid_act, out_act), conv = (stride,
    padding, dilation). Also the backward of the depthwise -> project part of the inverted residual."""
    x, dw_weight, dw_scale, dw_shift, pw_weight, pw_scale, pw_shift, residual, y = saved
    mid_act, out_act = acts
    stride, padding, dilation = conv
    channels = x.shape[1]

    # Recompute the intermediate instead of having stored it.
    u = F.conv2d(x, dw_weight, None, stride, padding, dilation, groups=channels)
    # As the forward kernels: a NaN weight makes its whole channel NaN (zero padding times NaN),
    # which PyTorch's float32 convolution does not do (it skips the padded taps).
    # (Added unconditionally: a data-dependent branch would break torch.compile and export.)
    u = u + _per_channel(dw_weight.sum(dim=(1, 2, 3)) * 0)
    a = u if dw_scale is None else u * _per_channel(dw_scale)
    if dw_shift is not None:
        a = a + _per_channel(dw_shift)
    t = apply_activation(a, mid_act)

    z = F.conv2d(t, pw_weight) if needs[6] or out_act in NEEDS_INPUT_FOR_GRAD else None
    pre = None
    if out_act in NEEDS_INPUT_FOR_GRAD:  # the output activation's input, recomputed
        pre = z if pw_scale is None else z * _per_channel(pw_scale)
        if pw_shift is not None:
            pre = pre + _per_channel(pw_shift)
        if residual is not None:
            pre = pre + residual
    g_b = activation_backward(grad_y, y, out_act, pre)  # grad of pre-activation output
    g_pw_scale = _channel_sum(g_b * z) if needs[6] else None
    g_pw_shift = _channel_sum(g_b) if needs[7] else None
    g_v = g_b if pw_scale is None else g_b * _per_channel(pw_scale)
    g_t, g_pw_weight, _ = torch.ops.aten.convolution_backward(
        g_v, t, pw_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, needs[5], False])

    g_a = activation_backward(g_t, t, mid_act, a)
    g_dw_scale = _channel_sum(g_a * u) if needs[2] else None
    g_dw_shift = _channel_sum(g_a) if needs[3] else None
    g_u = g_a if dw_scale is None else g_a * _per_channel(dw_scale)
    g_x, g_dw_weight, _ = torch.ops.aten.convolution_backward(
        g_u, x, dw_weight, None, stride, padding, dilation, False, [0, 0], channels, [needs[0], needs[1], False])

    g_residual = g_b if needs[8] else None
    return (g_x, g_dw_weight, g_dw_scale, g_dw_shift, None, g_pw_weight, g_pw_scale, g_pw_shift, g_residual,
            None, None, None, None)


joint_block.register_autograd(_backward, setup_context=_setup_context)
