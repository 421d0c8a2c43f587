"""Backward of lwkernels::inverted_residual: the expanded tensor is not saved; backward recomputes it
from x with PyTorch ops, runs the joint block's backward over it (ops/inference_backward.py) and then
the expand step's. Registered with torch.library.register_autograd (torch.compile-safe). Training
with batch statistics runs the modules, not this op (nn/inverted_residual.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activation import NEEDS_INPUT_FOR_GRAD, activation_backward, apply_activation
from ..cpu.backend import PACK_CACHE
from .inference_backward import joint_block_backward
from .inverted_residual import inverted_residual


def _setup_context(ctx, inputs, output):
    (x, expand_weight, expand_scale, expand_shift, expand_act, dw_weight, dw_scale, dw_shift, mid_act,
     pw_weight, pw_scale, pw_shift, residual, out_act, stride, padding, dilation) = inputs
    keep_residual = residual if out_act in NEEDS_INPUT_FOR_GRAD else None
    ctx.save_for_backward(x, expand_weight, expand_scale, expand_shift, dw_weight, dw_scale, dw_shift, pw_weight,
                          pw_scale, pw_shift, keep_residual, output)
    # As for joint_block: no packing that a `.data` write (gradcheck) could leave stale.
    PACK_CACHE.discard(expand_weight)
    PACK_CACHE.discard(pw_weight)
    ctx.acts = (expand_act, mid_act, out_act)
    ctx.conv = (list(stride), list(padding), list(dilation))


def _backward(ctx, grad_y):
    (x, expand_weight, expand_scale, expand_shift, dw_weight, dw_scale, dw_shift, pw_weight, pw_scale, pw_shift,
     residual, y) = ctx.saved_tensors
    expand_act, mid_act, out_act = ctx.acts
    needs = ctx.needs_input_grad
    expand_needed = any(needs[0:4])

    # The expanded tensor, recomputed.
    z = F.conv2d(x, expand_weight)
    a = z if expand_scale is None else z * expand_scale.reshape(1, -1, 1, 1)
    if expand_shift is not None:
        a = a + expand_shift.reshape(1, -1, 1, 1)
    e = apply_activation(a, expand_act)

    # joint_block's inputs: (x=e, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, pw_scale, pw_shift, residual).
    joint_needs = (expand_needed,) + tuple(needs[5:13])
    g = joint_block_backward(grad_y, (e, dw_weight, dw_scale, dw_shift, pw_weight, pw_scale, pw_shift, residual, y),
                             (mid_act, out_act), ctx.conv, joint_needs)
    g_x = g_expand_weight = g_expand_scale = g_expand_shift = None
    if expand_needed:
        g_a = activation_backward(g[0], e, expand_act, a)
        g_expand_scale = (g_a * z).sum(dim=(0, 2, 3)) if needs[2] else None
        g_expand_shift = g_a.sum(dim=(0, 2, 3)) if needs[3] else None
        g_z = g_a if expand_scale is None else g_a * expand_scale.reshape(1, -1, 1, 1)
        g_x, g_expand_weight, _ = torch.ops.aten.convolution_backward(
            g_z, x, expand_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [needs[0], needs[1], False])
    return (g_x, g_expand_weight, g_expand_scale, g_expand_shift, None, g[1], g[2], g[3], None, g[5], g[6], g[7], g[8],
            None, None, None, None)


inverted_residual.register_autograd(_backward, setup_context=_setup_context)
