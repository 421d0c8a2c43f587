"""The training op's CPU implementation (float32 and float64): the fused C++ forward with its
statistics epilogue, the C++ training kernels (lwkernels._C.train_*) and PyTorch's BLAS for the
backward's two pointwise GEMMs."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..ops.activation import NEEDS_INPUT_FOR_GRAD, activation_backward
from ..ops.args import TrainArgs, TrainOutputs, TrainSaved
from ..ops.batch_norm import STATS, bn_backward_coefficients, bn_scale_shift, mean_var, per_channel, with_bias_nan
from ..ops.contract import output_memory_format
from ..ops.training_reference import out_activation_input
from .backend import NATIVE_DTYPES, address, geometry_for, native, pack_pointwise, selected_isa


def handles(x: Tensor) -> bool:
    """CPU tensors in a dtype the C++ kernels compute in."""
    return x.device.type == "cpu" and x.dtype in NATIVE_DTYPES


class _TrainingKernels:
    """Argument plumbing for the C++ training kernels (lwkernels._C.train_*)."""

    def __init__(self, x: Tensor, c_out: int, out_hw: Tuple[int, int], kernel: Tuple[int, int],
                 stride, padding, dilation) -> None:
        self.fmt = output_memory_format(x)
        self.layout = "nhwc" if self.fmt == torch.channels_last else "nchw"
        self.dtype = "f32" if x.dtype == torch.float32 else "f64"
        self.isa = selected_isa()
        self.threads = torch.get_num_threads()
        n, c, h, w = x.shape
        oh, ow = out_hw
        self.dw_geo = [n, c, h, w, oh, ow, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1],
                       dilation[0], dilation[1]]
        self.mid_geo = [n, c, oh * ow]
        self.out_geo = [n, c_out, oh * ow]
        self.C = native()

    def dense(self, t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.contiguous(memory_format=self.fmt)

    a = staticmethod(address)

    def dw_forward(self, x, w, scale=None, shift=None, act="none", raw=None, out=None, sum_=None, sumsq=None):
        a = self.a
        self.C.train_dw_forward(self.dtype, self.isa, self.dw_geo, self.layout, a(x), a(w), a(scale), a(shift),
                                act, a(raw), a(out), a(sum_), a(sumsq), self.threads)


def _fused_pointwise(k: _TrainingKernels, x, dw, dw_scale, dw_shift, mid_act, pw_weight, pw_bias, stride, padding, dilation,
                     out_shape) -> Tuple[Tensor, Tensor, Tensor]:
    """(z, sum, sumsq): z = PW(mid_act(dw_scale * DW(x) + dw_shift)) + pw_bias through the fused C++
    forward kernel (joint_block.h), and the per-channel sum and sum of squares of z (float64) from
    that kernel's epilogue. The depthwise output stays in the kernel's tile buffers and z is not read
    back for its statistics.

    The pointwise weight is packed per call rather than through PACK_CACHE: in training it changes
    every step (and gradcheck perturbs it where no version counter sees it)."""
    packed = pack_pointwise(pw_weight, k.isa, k.layout)
    z = torch.empty(out_shape, dtype=x.dtype).contiguous(memory_format=k.fmt)
    vectors = [None if v is None else v.contiguous() for v in (dw_scale, dw_shift, pw_bias)]
    geometry = geometry_for(k.C, tuple(x.shape), tuple(out_shape), tuple(dw.shape[2:]), tuple(stride), tuple(padding),
                            tuple(dilation), k.layout)
    a = k.a
    s = torch.empty(out_shape[1], dtype=STATS)
    ss = torch.empty_like(s)
    k.C.joint_forward(packed, geometry, a(x), a(dw), a(vectors[0]), a(vectors[1]), mid_act, 0, a(vectors[2]), 0,
                      "none", a(z), k.threads, a(s), a(ss))
    return z, s, ss


def forward(args: TrainArgs, out_shape: Tuple[int, int, int, int]) -> TrainOutputs:
    """The mid statistics from a depthwise pass that stores nothing; z and its statistics from the
    fused depthwise -> pointwise kernel (the depthwise output never reaches memory, the sums come
    from the kernel's epilogue); then one pass normalises, adds the residual and activates."""
    x = args.x
    n, c_in = x.shape[:2]
    c_out = out_shape[1]
    k = _TrainingKernels(x, c_out, out_shape[2:], tuple(args.dw_weight.shape[2:]), args.stride, args.padding, args.dilation)
    x = k.dense(x)
    dw = args.dw_weight.contiguous()
    count = n * out_shape[2] * out_shape[3]
    if args.mid_bn:
        s = torch.empty(c_in, dtype=STATS)
        ss = torch.empty_like(s)
        k.dw_forward(x, dw, sum_=s, sumsq=ss)  # statistics only: nothing stored
        mid_mean, mid_var = mean_var(s, ss, count)
        mid_var = with_bias_nan(mid_var, args.dw_bias)
        dw_scale, dw_shift = (v.to(x.dtype) for v in bn_scale_shift(mid_mean, mid_var, args.mid_weight, args.mid_bias,
                                                                   args.mid_eps))
        mid_mean, mid_var = mid_mean.to(x.dtype), mid_var.to(x.dtype)
    else:
        dw_scale, dw_shift = None, args.dw_bias
        mid_mean, mid_var = x.new_empty(0), x.new_empty(0)
    # z and its statistics: the fused depthwise -> pointwise kernel with the pointwise bias and the
    # per-channel sums as its epilogue.
    z, s, ss = _fused_pointwise(k, x, dw, dw_scale, dw_shift, args.mid_act, args.pw_weight, args.pw_bias,
                                args.stride, args.padding, args.dilation, out_shape)
    mean, var = mean_var(s, ss, count)
    scale, shift = (v.to(x.dtype) for v in bn_scale_shift(mean, var, args.bn_weight, args.bn_bias, args.eps))
    y = torch.empty_like(z)
    res = k.dense(args.residual)
    native().train_affine_act(k.dtype, k.isa, k.out_geo, k.layout, z.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                              k.a(res), args.out_act, y.data_ptr(), k.threads)
    return y, z, mean.to(x.dtype), var.to(x.dtype), mid_mean, mid_var


def _pointwise_grads_nchw(w2: Tensor, gz3: Tensor, t3: Tensor, need_t: bool, need_w: bool):
    """(grad t, grad W) of z = W t per image: W^T gz ([N, C_in, P]) and sum_n gz_n t_n^T ([C_out, C_in]),
    from W [C_out, C_in], gz [N, C_out, P] and t [N, C_in, P]; None where not needed.

    Few pixels per image (7x7 maps): GEMMs of 49 columns or a depth of 49 run well below the BLAS
    rate, so gz and t are transposed into [N*P, C] matrices (copies) and each gradient is one GEMM.
    Otherwise grad t is one batched GEMM with W broadcast (torch.matmul(W^T, gz) would copy W per
    image) and grad W accumulates one GEMM per image. (2 threads, Xeon, batch 8: 1024->1024 on 7x7
    270 vs 204-224 GFLOP/s for grad W; 512->512 on 14x14, per image 281-288 vs 236 transposed.)"""
    n, c_out, p = gz3.shape
    c_in = w2.shape[1]
    g_t = g_w = None
    if p < 128:
        gz_rows = gz3.transpose(1, 2).reshape(n * p, c_out)
        if need_t:
            g_t = torch.mm(gz_rows, w2).view(n, p, c_in).transpose(1, 2).contiguous()
        if need_w:
            g_w = torch.mm(gz_rows.t(), t3.transpose(1, 2).reshape(n * p, c_in))
        return g_t, g_w
    if need_t:
        g_t = torch.bmm(w2.t().expand(n, c_in, c_out), gz3)
    if need_w:
        g_w = torch.mm(gz3[0], t3[0].t())
        for i in range(1, n):
            g_w.addmm_(gz3[i], t3[i].t())
    return g_t, g_w


def _activation_grad_first(grad: Tensor, out: Tensor, act: str, activation_input, k: "_TrainingKernels"):
    """(gradient, activation) for the C++ reduction. relu/relu6 gradients are applied inside it, read
    off the activation's output; hardswish/silu need their input (activation_input() recomputes it),
    so PyTorch's own backward applies them here and the reduction gets "none"."""
    if act not in NEEDS_INPUT_FOR_GRAD:
        return k.dense(grad), act
    return k.dense(activation_backward(grad, out, act, activation_input())), "none"


def backward(grad_y: Tensor, saved: TrainSaved, needs: List[bool]) -> List[Optional[Tensor]]:
    """C++ passes for the activation/BatchNorm gradients and the depthwise backward (the depthwise
    output recomputed from x); the two pointwise GEMMs on PyTorch's BLAS. Gradients in GRAD_NAMES
    order, None where not needed."""
    x, y, z = saved.x, saved.y, saved.z
    n, c_in = x.shape[:2]
    c_out, oh, ow = z.shape[1:]
    count = n * oh * ow
    k = _TrainingKernels(x, c_out, (oh, ow), tuple(saved.dw_weight.shape[2:]), saved.stride, saved.padding, saved.dilation)
    a_ = k.a
    lib, dt, isa, lay, th = k.C, k.dtype, k.isa, k.layout, k.threads
    x, y, z = k.dense(x), k.dense(y), k.dense(z)
    g = k.dense(grad_y)
    dw = saved.dw_weight.contiguous()

    # out activation + BatchNorm (batch statistics).
    gb = torch.empty_like(z)
    sum_g = torch.empty(c_out, dtype=STATS)
    sum_gz = torch.empty_like(sum_g)
    mean_t = saved.mean.contiguous()
    g, out_act = _activation_grad_first(g, y, saved.out_act, lambda: out_activation_input(saved), k)
    lib.train_act_backward_reduce(dt, isa, k.out_geo, lay, a_(g), a_(y), out_act, a_(z), a_(mean_t), a_(gb),
                                  a_(sum_g), a_(sum_gz), th)
    A, B, invstd = bn_backward_coefficients(sum_g, sum_gz, saved.var, saved.bn_weight, saved.eps, count)
    K = -B * saved.mean.to(STATS) - A * sum_g / count
    g_bn_w = (sum_gz * invstd).to(x.dtype) if needs[7] else None
    g_bn_b = sum_g.to(x.dtype) if needs[8] else None
    g_res = gb if needs[9] else None
    gz = torch.empty_like(z) if needs[9] else gb  # in place unless gb is the residual's gradient
    coef = [v.to(x.dtype) for v in (A, B, K)]  # kept alive across the call
    lib.train_affine_backward_apply(dt, isa, k.out_geo, lay, a_(gb), a_(z), *(a_(v) for v in coef), a_(gz), th)
    # The pointwise bias feeds BatchNorm only, so its gradient sum(gz) is zero up to rounding; it is
    # still summed, as autograd does, so that a NaN in gz reaches it exactly as in PyTorch.
    g_pw_b = gz.sum(dim=(0, 2, 3)) if needs[6] else None

    if not any(needs[:6]):
        return [None, None, None, None, None, None, g_pw_b, g_bn_w, g_bn_b, g_res]

    # Recompute the depthwise output c (with mid BN) and t = mid_act(mid(c)).
    t = torch.empty((n, c_in, oh, ow), dtype=x.dtype).contiguous(memory_format=k.fmt)
    if saved.mid_bn:
        sc, sh = (v.to(x.dtype) for v in bn_scale_shift(saved.mid_mean, saved.mid_var, saved.mid_weight,
                                                         saved.mid_bias, saved.mid_eps))
        c = torch.empty_like(t)
        k.dw_forward(x, dw, sc, sh, saved.mid_act, raw=c, out=t)
    else:
        dw_bias = None if saved.dw_bias is None else saved.dw_bias.contiguous()
        c = torch.empty_like(t) if saved.mid_act in NEEDS_INPUT_FOR_GRAD else None  # the mid act's input
        k.dw_forward(x, dw, None, dw_bias, saved.mid_act, raw=c, out=t)
        if c is not None and dw_bias is not None:
            c = c + per_channel(dw_bias)

    # Pointwise: grad t = W^T gz, grad W = gz t^T (BLAS).
    w2 = saved.pw_weight.reshape(c_out, c_in)
    g_pw_w = None
    if k.layout == "nhwc":
        gz2 = gz.permute(0, 2, 3, 1).reshape(count, c_out)
        t2 = t.permute(0, 2, 3, 1).reshape(count, c_in)
        g_t = torch.mm(gz2, w2).reshape(n, oh, ow, c_in).permute(0, 3, 1, 2) if any(needs[:5]) else None
        if needs[5]:
            g_pw_w = torch.mm(gz2.t(), t2)
    else:
        g_t, g_pw_w = _pointwise_grads_nchw(w2, gz.reshape(n, c_out, oh * ow), t.reshape(n, c_in, oh * ow),
                                            any(needs[:5]), needs[5])
        if g_t is not None:
            g_t = g_t.view(n, c_in, oh, ow)
    if g_pw_w is not None:
        g_pw_w = g_pw_w.reshape(saved.pw_weight.shape)
    if g_t is None:
        return [None, None, None, None, None, g_pw_w, g_pw_b, g_bn_w, g_bn_b, g_res]

    # mid activation (+ mid BatchNorm).
    g_mid_w = g_mid_b = g_dw_b = None
    if saved.mid_bn:
        gc = torch.empty_like(t)
        s1 = torch.empty(c_in, dtype=STATS)
        s2 = torch.empty_like(s1)
        mid_mean_t = saved.mid_mean.contiguous()
        g_t, mid_act = _activation_grad_first(g_t, t, saved.mid_act,
                                              lambda: c * per_channel(sc) + per_channel(sh), k)
        lib.train_act_backward_reduce(dt, isa, k.mid_geo, lay, a_(g_t), a_(t), mid_act, a_(c), a_(mid_mean_t),
                                      a_(gc), a_(s1), a_(s2), th)
        A2, B2, invstd2 = bn_backward_coefficients(s1, s2, saved.mid_var, saved.mid_weight, saved.mid_eps, count)
        K2 = -B2 * saved.mid_mean.to(STATS) - A2 * s1 / count
        coef = [v.to(x.dtype) for v in (A2, B2, K2)]
        lib.train_affine_backward_apply(dt, isa, k.mid_geo, lay, a_(gc), a_(c), *(a_(v) for v in coef), a_(gc), th)
        g_mid_w = (s2 * invstd2).to(x.dtype) if needs[3] else None
        g_mid_b = s1.to(x.dtype) if needs[4] else None
        g_dw_b = gc.sum(dim=(0, 2, 3)) if needs[2] else None  # cancels in mid BN up to rounding and NaN
    elif saved.mid_act != "none" or needs[2]:
        gc = torch.empty_like(t)
        s1 = torch.empty(c_in, dtype=STATS)
        g_t, mid_act = _activation_grad_first(g_t, t, saved.mid_act, lambda: c, k)
        lib.train_act_backward_reduce(dt, isa, k.mid_geo, lay, a_(g_t), a_(t), mid_act, 0, 0, a_(gc), a_(s1), 0, th)
        g_dw_b = s1.to(x.dtype) if needs[2] else None
    else:
        gc = k.dense(g_t)

    # Depthwise backward (C++).
    g_x = torch.empty_like(x) if needs[0] else None
    g_dw = torch.empty(c_in, dw.shape[2] * dw.shape[3], dtype=x.dtype) if needs[1] else None
    if needs[0] or needs[1]:
        lib.train_dw_backward(dt, isa, k.dw_geo, lay, a_(x), a_(dw), a_(gc), a_(g_x), a_(g_dw), th)
    if g_dw is not None:
        g_dw = g_dw.reshape(saved.dw_weight.shape)
    return [g_x, g_dw, g_dw_b, g_mid_w, g_mid_b, g_pw_w, g_pw_b, g_bn_w, g_bn_b, g_res]
