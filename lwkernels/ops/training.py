"""The joint block in training mode: BatchNorm with batch statistics, fused, with its backward.

    c = depthwise_conv(x; stride, padding, dilation)
    t = mid_act(mid_bn(c + dw_bias))                 mid_bn: batch statistics (optional)
    z = pointwise_conv(t) + pw_bias
    y = out_act(bn(z) + residual)                    bn: batch statistics

Two ops, both ``torch.library.custom_op`` (so torch.compile(fullgraph=True) traces them):

``lwkernels::joint_block_train`` -> (y, z, mean, var, mid_mean, mid_var)
    The forward. mean/var are the biased batch statistics of z (mid_*: of c, empty without mid BN).
    CPU (float32/float64): the mid statistics come from a depthwise pass that stores nothing; z
    from the fused depthwise->pointwise C++ kernel (joint_block.h; the depthwise intermediate
    never reaches memory) together with the statistics of z (sums in that kernel's epilogue, so z
    is not read back for them), then one C++ pass normalises, adds the residual and activates.
    CUDA (fp16/bf16/fp32, with Triton): the mid statistics from a Triton depthwise pass that
    stores nothing; z and its statistics from the fused
    Triton kernel (triton_kernel.pointwise_stats_triton: depthwise -> pointwise with a statistics
    epilogue, so the depthwise intermediate never reaches memory); normalise + residual + activation
    in PyTorch ops. Other devices/dtypes: PyTorch ops (correct, unfused).

``lwkernels::joint_block_train_backward``
    Its backward (registered with register_autograd). Saved for backward: x, y and z (plus the
    parameters and per-channel statistics); the depthwise output is recomputed from x. CPU: C++
    passes for the activation/BatchNorm gradients and for the depthwise backward (grad input and
    grad weight, dilated, strided, NCHW and channels_last); the two pointwise GEMMs
    (grad t = W^T grad z, grad W = grad z t^T) run on PyTorch's BLAS. CUDA: the depthwise backward
    as Triton kernels (triton/dw_backward.py); the recomputation, the activation/BatchNorm
    gradients and the pointwise GEMMs (cuBLAS through aten.convolution_backward) in PyTorch ops.

Running statistics (momentum, momentum=None, num_batches_tracked, unbiased running_var) are
updated in Python by :func:`joint_block_training`, exactly as nn.BatchNorm2d does.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activation import activation_backward, activation_name, apply_activation
from .contract import check_joint_args, output_memory_format
from ..cpu.backend import NATIVE_DTYPES, PACK_CACHE, address, native, selected_isa

_STATS = torch.float64  # per-channel sums are accumulated in double


def _pc(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


def _out_shape(x, dw_weight, pw_weight, residual, mid_act, out_act, stride, padding, dilation):
    return check_joint_args(x, dw_weight, None, None, mid_act, pw_weight, None, None, residual, out_act,
                            stride, padding, dilation)


def _uses_cpp(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in NATIVE_DTYPES


class _Cpp:
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


def _mean_var(s: Tensor, ss: Tensor, count: int) -> Tuple[Tensor, Tensor]:
    mean = s / count
    return mean, (ss / count - mean * mean).clamp_min(0)


def _bn_scale_shift(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    """(scale, shift) with BN(v) = scale * v + shift for batch statistics (mean, var)."""
    scale = torch.rsqrt(var.to(_STATS) + eps)
    if weight is not None:
        scale = scale * weight.to(_STATS)
    shift = -mean.to(_STATS) * scale
    if bias is not None:
        shift = shift + bias.to(_STATS)
    return scale, shift


def _with_bias_nan(mid_var: Tensor, dw_bias: Optional[Tensor]) -> Tensor:
    """mid BatchNorm's batch variance of c + dw_bias, from that of c: the bias cancels in BatchNorm,
    but a NaN bias still makes its channel's statistics (and so the channel) NaN in PyTorch."""
    return mid_var if dw_bias is None else mid_var + dw_bias.to(mid_var.dtype) * 0


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
    out_shape = _out_shape(x, dw_weight, pw_weight, residual, mid_act, out_act, stride, padding, dilation)
    if _uses_cpp(x):
        return _forward_cpu(x, dw_weight, dw_bias, mid_weight, mid_bias, mid_bn, mid_eps, mid_act, pw_weight, pw_bias,
                            bn_weight, bn_bias, eps, residual, out_act, stride, padding, dilation, out_shape)
    if _uses_triton(x, out_shape):
        return _forward_triton(x, dw_weight, dw_bias, mid_weight, mid_bias, mid_bn, mid_eps, mid_act, pw_weight,
                               pw_bias, bn_weight, bn_bias, eps, residual, out_act, stride, padding, dilation)
    return _forward_torch(x, dw_weight, dw_bias, mid_weight, mid_bias, mid_bn, mid_eps, mid_act, pw_weight, pw_bias,
                          bn_weight, bn_bias, eps, residual, out_act, stride, padding, dilation)


def _uses_triton(x: Tensor, out_shape) -> bool:
    """_uses_triton_backward's conditions, and a non-empty output (an empty batch has no statistics
    to compute; PyTorch ops return its NaN means)."""
    return x.shape[0] * out_shape[2] * out_shape[3] > 0 and _uses_triton_backward(x)


def _forward_triton(x, dw_weight, dw_bias, mid_weight, mid_bias, mid_bn, mid_eps, mid_act, pw_weight, pw_bias,
                    bn_weight, bn_bias, eps, residual, out_act, stride, padding, dilation):
    """CUDA: mid statistics from a depthwise pass that stores nothing (Triton), then z and its batch
    statistics from the fused depthwise -> pointwise Triton kernel (the depthwise output never reaches
    memory; the statistics come from the kernel's epilogue). Normalise + residual + activation: PyTorch
    ops (one elementwise pass)."""
    from ..triton.backend import uses_tf32
    from ..triton.joint_block import depthwise_stats_triton, pointwise_stats_triton

    fmt = output_memory_format(x)
    if mid_bn:
        mid_mean, mid_var = depthwise_stats_triton(x, dw_weight, stride, padding, dilation)
        mid_var = _with_bias_nan(mid_var, dw_bias)
        # The kernel reads the per-channel affine as fp32 (the bias before BN cancels).
        dw_scale, dw_shift = (v.float() for v in _bn_scale_shift(mid_mean, mid_var, mid_weight, mid_bias, mid_eps))
        mid_mean, mid_var = mid_mean.to(x.dtype), mid_var.to(x.dtype)
    else:
        dw_scale, dw_shift = None, dw_bias
        mid_mean, mid_var = x.new_empty(0), x.new_empty(0)
    z, mean, var = pointwise_stats_triton(x, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, pw_bias, stride,
                                          padding, dilation, allow_tf32=uses_tf32(x))
    y = _normalise_torch(z, mean, var, bn_weight, bn_bias, eps, residual, out_act)
    return (y.contiguous(memory_format=fmt), z, mean.to(x.dtype), var.to(x.dtype), mid_mean, mid_var)


def _normalise_torch(z, mean, var, bn_weight, bn_bias, eps, residual, out_act) -> Tensor:
    """out_act(bn(z) + residual) with the batch statistics (mean, var), in z's dtype."""
    scale, shift = _bn_scale_shift(mean, var, bn_weight, bn_bias, eps)
    v = z * _pc(scale.to(z.dtype)) + _pc(shift.to(z.dtype))
    if residual is not None:
        v = v + residual
    return apply_activation(v, out_act)


def _forward_torch(x, dw_weight, dw_bias, mid_weight, mid_bias, mid_bn, mid_eps, mid_act, pw_weight, pw_bias,
                   bn_weight, bn_bias, eps, residual, out_act, stride, padding, dilation):
    """PyTorch ops: any device and dtype (CUDA tensors without Triton, fp64, empty batches)."""
    fmt = output_memory_format(x)
    c = F.conv2d(x, dw_weight, None, stride, padding, dilation, groups=x.shape[1])
    if mid_bn:
        mid_mean = c.mean(dim=(0, 2, 3))
        mid_var = _with_bias_nan(c.var(dim=(0, 2, 3), unbiased=False), dw_bias)
        scale, shift = _bn_scale_shift(mid_mean, mid_var, mid_weight, mid_bias, mid_eps)
        a = c * _pc(scale.to(c.dtype)) + _pc(shift.to(c.dtype))
    else:
        mid_mean, mid_var = x.new_empty(0), x.new_empty(0)
        a = c if dw_bias is None else c + _pc(dw_bias)
    z = F.conv2d(apply_activation(a, mid_act), pw_weight, pw_bias)
    mean = z.mean(dim=(0, 2, 3))
    var = z.var(dim=(0, 2, 3), unbiased=False)
    y = _normalise_torch(z, mean, var, bn_weight, bn_bias, eps, residual, out_act)
    return (y.contiguous(memory_format=fmt), z.contiguous(memory_format=fmt), mean, var,
            mid_mean.contiguous(), mid_var.contiguous())


def _fused_pointwise(k: "_Cpp", x, dw, dw_scale, dw_shift, mid_act, pw_weight, pw_bias, stride, padding, dilation,
                     out_shape) -> Tuple[Tensor, Tensor, Tensor]:
    """(z, sum, sumsq): z = PW(mid_act(dw_scale * DW(x) + dw_shift)) + pw_bias through the fused C++
    forward kernel (joint_block.h), and the per-channel sum and sum of squares of z (float64) from
    that kernel's epilogue. The depthwise output stays in the kernel's tile buffers and z is not read
    back for its statistics.

    The pointwise weight is packed per call rather than through cpu_backend's cache: in training it
    changes every step (and gradcheck perturbs it where no version counter sees it)."""
    packed = PACK_CACHE._pack(pw_weight, k.isa, k.layout)
    z = torch.empty(out_shape, dtype=x.dtype).contiguous(memory_format=k.fmt)
    vectors = [None if v is None else v.contiguous() for v in (dw_scale, dw_shift, pw_bias)]
    n, c_in, h, w = x.shape
    geometry = k.C.JointGeometry(
        batch=n, in_channels=c_in, in_h=h, in_w=w, out_channels=out_shape[1], out_h=out_shape[2],
        out_w=out_shape[3], kernel_h=dw.shape[2], kernel_w=dw.shape[3], stride_h=stride[0], stride_w=stride[1],
        pad_h=padding[0], pad_w=padding[1], dil_h=dilation[0], dil_w=dilation[1], layout=k.layout)
    a = k.a
    s = torch.empty(out_shape[1], dtype=_STATS)
    ss = torch.empty_like(s)
    k.C.joint_forward(packed, geometry, a(x), a(dw), a(vectors[0]), a(vectors[1]), mid_act, 0, a(vectors[2]), 0,
                      "none", a(z), k.threads, a(s), a(ss))
    return z, s, ss


def _forward_cpu(x, dw_weight, dw_bias, mid_weight, mid_bias, mid_bn, mid_eps, mid_act, pw_weight, pw_bias,
                 bn_weight, bn_bias, eps, residual, out_act, stride, padding, dilation, out_shape):
    n, c_in = x.shape[:2]
    c_out = out_shape[1]
    k = _Cpp(x, c_out, out_shape[2:], tuple(dw_weight.shape[2:]), stride, padding, dilation)
    x = k.dense(x)
    dw = dw_weight.contiguous()
    count = n * out_shape[2] * out_shape[3]
    if mid_bn:
        s = torch.empty(c_in, dtype=_STATS)
        ss = torch.empty_like(s)
        k.dw_forward(x, dw, sum_=s, sumsq=ss)  # statistics only: nothing stored
        mid_mean, mid_var = _mean_var(s, ss, count)
        mid_var = _with_bias_nan(mid_var, dw_bias)
        dw_scale, dw_shift = (v.to(x.dtype) for v in _bn_scale_shift(mid_mean, mid_var, mid_weight, mid_bias, mid_eps))
        mid_mean, mid_var = mid_mean.to(x.dtype), mid_var.to(x.dtype)
    else:
        dw_scale, dw_shift = None, dw_bias
        mid_mean, mid_var = x.new_empty(0), x.new_empty(0)
    # z and its statistics: the fused depthwise -> pointwise kernel with the pointwise bias and the
    # per-channel sums as its epilogue.
    z, s, ss = _fused_pointwise(k, x, dw, dw_scale, dw_shift, mid_act, pw_weight, pw_bias, stride, padding,
                                dilation, out_shape)
    mean, var = _mean_var(s, ss, count)
    scale, shift = (v.to(x.dtype) for v in _bn_scale_shift(mean, var, bn_weight, bn_bias, eps))
    y = torch.empty_like(z)
    res = k.dense(residual)
    native().train_affine_act(k.dtype, k.isa, k.out_geo, k.layout, z.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                              k.a(res), out_act, y.data_ptr(), k.threads)
    return y, z, mean.to(x.dtype), var.to(x.dtype), mid_mean, mid_var


@joint_block_train.register_fake
def _joint_block_train_fake(x, dw_weight, dw_bias, mid_weight, mid_bias, mid_bn, mid_eps, mid_act, pw_weight, pw_bias,
                            bn_weight, bn_bias, eps, residual, out_act, stride, padding, dilation):
    shape = _out_shape(x, dw_weight, pw_weight, residual, mid_act, out_act, stride, padding, dilation)
    fmt = output_memory_format(x)
    y = x.new_empty(shape).contiguous(memory_format=fmt)
    z = x.new_empty(shape).contiguous(memory_format=fmt)
    c_mid = x.shape[1] if mid_bn else 0
    return y, z, x.new_empty(shape[1]), x.new_empty(shape[1]), x.new_empty(c_mid), x.new_empty(c_mid)


# ---- backward ------------------------------------------------------------------------------------
# needs: [x, dw_weight, dw_bias, mid_weight, mid_bias, pw_weight, pw_bias, bn_weight, bn_bias, residual]
_GRAD_NAMES = ("x", "dw_weight", "dw_bias", "mid_weight", "mid_bias", "pw_weight", "pw_bias", "bn_weight",
               "bn_bias", "residual")


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
    """Gradients of joint_block_train's y for the inputs flagged in `needs` (order: _GRAD_NAMES);
    an empty tensor stands for each one not asked for (mid BatchNorm's when mid_bn is False)."""
    needs = _effective_needs(needs, mid_bn)
    fn = _backward_cpu if _uses_cpp(x) else _backward_torch
    grads = fn(grad_y, x, dw_weight, dw_bias, mid_weight, mid_bias, mid_mean, mid_var, mid_bn, mid_eps, mid_act,
               pw_weight, bn_weight, y, z, mean, var, eps, out_act, stride, padding, dilation, needs)
    return [g if (need and g is not None) else x.new_empty(0) for g, need in zip(grads, needs)]


def _effective_needs(needs: List[bool], mid_bn: bool) -> List[bool]:
    if len(needs) != len(_GRAD_NAMES):
        raise ValueError(f"needs must have {len(_GRAD_NAMES)} flags ({', '.join(_GRAD_NAMES)})")
    return [bool(n) and (mid_bn or i not in (3, 4)) for i, n in enumerate(needs)]


def _bn_backward_coefficients(sum_g, sum_gz, var, weight, eps, count):
    """BatchNorm (batch statistics) input gradient as gz = A * gb + B * z + K, from the per-channel
    sums of gb and gb * (z - mean): returns (A, B, K_without_mean_term, invstd)."""
    invstd = torch.rsqrt(var.to(_STATS) + eps)
    a = invstd if weight is None else weight.to(_STATS) * invstd
    b = -a * invstd * invstd * sum_gz / count
    return a, b, invstd


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


def _backward_cpu(grad_y, x, dw_weight, dw_bias, mid_weight, mid_bias, mid_mean, mid_var, mid_bn, mid_eps, mid_act,
                  pw_weight, bn_weight, y, z, mean, var, eps, out_act, stride, padding, dilation, needs):
    n, c_in = x.shape[:2]
    c_out, oh, ow = z.shape[1:]
    count = n * oh * ow
    k = _Cpp(x, c_out, (oh, ow), tuple(dw_weight.shape[2:]), stride, padding, dilation)
    a_ = k.a
    lib, dt, isa, lay, th = k.C, k.dtype, k.isa, k.layout, k.threads
    x, y, z = k.dense(x), k.dense(y), k.dense(z)
    g = k.dense(grad_y)
    dw = dw_weight.contiguous()

    # out activation + BatchNorm (batch statistics).
    gb = torch.empty_like(z)
    sum_g = torch.empty(c_out, dtype=_STATS)
    sum_gz = torch.empty_like(sum_g)
    mean_t = mean.contiguous()
    lib.train_act_backward_reduce(dt, isa, k.out_geo, lay, a_(g), a_(y), out_act, a_(z), a_(mean_t), a_(gb),
                                  a_(sum_g), a_(sum_gz), th)
    A, B, invstd = _bn_backward_coefficients(sum_g, sum_gz, var, bn_weight, eps, count)
    K = -B * mean.to(_STATS) - A * sum_g / count
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
    if mid_bn:
        sc, sh = (v.to(x.dtype) for v in _bn_scale_shift(mid_mean, mid_var, mid_weight, mid_bias, mid_eps))
        c = torch.empty_like(t)
        k.dw_forward(x, dw, sc, sh, mid_act, raw=c, out=t)
    else:
        k.dw_forward(x, dw, None, None if dw_bias is None else dw_bias.contiguous(), mid_act, out=t)

    # Pointwise: grad t = W^T gz, grad W = gz t^T (BLAS).
    w2 = pw_weight.reshape(c_out, c_in)
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
        g_pw_w = g_pw_w.reshape(pw_weight.shape)
    if g_t is None:
        return [None, None, None, None, None, g_pw_w, g_pw_b, g_bn_w, g_bn_b, g_res]

    # mid activation (+ mid BatchNorm).
    g_mid_w = g_mid_b = g_dw_b = None
    if mid_bn:
        gc = torch.empty_like(t)
        s1 = torch.empty(c_in, dtype=_STATS)
        s2 = torch.empty_like(s1)
        mid_mean_t = mid_mean.contiguous()
        lib.train_act_backward_reduce(dt, isa, k.mid_geo, lay, a_(g_t), a_(t), mid_act, a_(c), a_(mid_mean_t),
                                      a_(gc), a_(s1), a_(s2), th)
        A2, B2, invstd2 = _bn_backward_coefficients(s1, s2, mid_var, mid_weight, mid_eps, count)
        K2 = -B2 * mid_mean.to(_STATS) - A2 * s1 / count
        coef = [v.to(x.dtype) for v in (A2, B2, K2)]
        lib.train_affine_backward_apply(dt, isa, k.mid_geo, lay, a_(gc), a_(c), *(a_(v) for v in coef), a_(gc), th)
        g_mid_w = (s2 * invstd2).to(x.dtype) if needs[3] else None
        g_mid_b = s1.to(x.dtype) if needs[4] else None
        g_dw_b = gc.sum(dim=(0, 2, 3)) if needs[2] else None  # cancels in mid BN up to rounding and NaN
    elif mid_act != "none" or needs[2]:
        gc = torch.empty_like(t)
        s1 = torch.empty(c_in, dtype=_STATS)
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
        g_dw = g_dw.reshape(dw_weight.shape)
    return [g_x, g_dw, g_dw_b, g_mid_w, g_mid_b, g_pw_w, g_pw_b, g_bn_w, g_bn_b, g_res]


def _backward_torch(grad_y, x, dw_weight, dw_bias, mid_weight, mid_bias, mid_mean, mid_var, mid_bn, mid_eps, mid_act,
                    pw_weight, bn_weight, y, z, mean, var, eps, out_act, stride, padding, dilation, needs,
                    triton_depthwise: Optional[bool] = None):
    """The same backward in PyTorch ops (any device; the CUDA slot), except the depthwise backward
    (grad x and grad dw_weight), which runs as Triton kernels on CUDA (triton_depthwise: None = when
    _uses_triton_backward says so; True forces them, as the interpreter tests do on CPU tensors)."""
    n, c_in = x.shape[:2]
    c_out, oh, ow = z.shape[1:]
    count = n * oh * ow
    dims = (0, 2, 3)
    gb = activation_backward(grad_y, y, out_act)
    zc = z - _pc(mean)
    sum_g = gb.sum(dims, dtype=_STATS)
    sum_gz = (gb * zc).sum(dims, dtype=_STATS)
    A, B, invstd = _bn_backward_coefficients(sum_g, sum_gz, var, bn_weight, eps, count)
    gz = _pc(A.to(z.dtype)) * (gb - _pc((sum_g / count).to(z.dtype))) + _pc(B.to(z.dtype)) * zc
    grads: List[Optional[Tensor]] = [None] * 10
    grads[6] = gz.sum(dims) if needs[6] else None  # zero up to rounding and NaN, as autograd has it
    grads[7] = (sum_gz * invstd).to(x.dtype) if needs[7] else None
    grads[8] = sum_g.to(x.dtype) if needs[8] else None
    grads[9] = gb if needs[9] else None
    if not any(needs[:6]):
        return grads
    c = F.conv2d(x, dw_weight, None, stride, padding, dilation, groups=c_in)
    if mid_bn:
        sc, sh = _bn_scale_shift(mid_mean, mid_var, mid_weight, mid_bias, mid_eps)
        a = c * _pc(sc.to(c.dtype)) + _pc(sh.to(c.dtype))
    else:
        a = c if dw_bias is None else c + _pc(dw_bias)
    t = apply_activation(a, mid_act)
    g_t, g_pw_w, _ = torch.ops.aten.convolution_backward(
        gz, t, pw_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, needs[5], False])
    grads[5] = g_pw_w
    ga = activation_backward(g_t, t, mid_act)
    if mid_bn:
        cc = c - _pc(mid_mean)
        s1 = ga.sum(dims, dtype=_STATS)
        s2 = (ga * cc).sum(dims, dtype=_STATS)
        A2, B2, invstd2 = _bn_backward_coefficients(s1, s2, mid_var, mid_weight, mid_eps, count)
        gc = _pc(A2.to(c.dtype)) * (ga - _pc((s1 / count).to(c.dtype))) + _pc(B2.to(c.dtype)) * cc
        grads[3] = (s2 * invstd2).to(x.dtype) if needs[3] else None
        grads[4] = s1.to(x.dtype) if needs[4] else None
        grads[2] = gc.sum(dims) if needs[2] else None  # cancels in mid BN up to rounding and NaN
    else:
        gc = ga
        grads[2] = ga.sum(dims) if needs[2] else None
    if needs[0] or needs[1]:
        if triton_depthwise is None:
            triton_depthwise = _uses_triton_backward(x)
        if triton_depthwise:
            from ..triton.dw_backward import depthwise_backward_triton

            g_x, g_dw = depthwise_backward_triton(gc, x, dw_weight, stride, padding, dilation, needs[0], needs[1])
        else:
            g_x, g_dw, _ = torch.ops.aten.convolution_backward(
                gc, x, dw_weight, None, stride, padding, dilation, False, [0, 0], c_in, [needs[0], needs[1], False])
        grads[0], grads[1] = g_x, g_dw
    return grads


def _uses_triton_backward(x: Tensor) -> bool:
    """CUDA tensors in a Triton kernel dtype (fp16/bf16/fp32), with Triton importable: the depthwise
    backward runs as Triton kernels (triton/dw_backward.py)."""
    if x.device.type != "cuda":
        return False
    from ..triton.backend import triton_available

    if not triton_available():
        return False
    from ..triton.joint_block import KERNEL_DTYPES

    return x.dtype in KERNEL_DTYPES


@joint_block_train_backward.register_fake
def _joint_block_train_backward_fake(grad_y, x, dw_weight, dw_bias, mid_weight, mid_bias, mid_mean, mid_var, mid_bn,
                                     mid_eps, mid_act, pw_weight, bn_weight, y, z, mean, var, eps, out_act, stride,
                                     padding, dilation, needs):
    c_in, c_out = x.shape[1], z.shape[1]
    fmt = output_memory_format(x)
    needs = _effective_needs(needs, mid_bn)
    shapes = [None, dw_weight.shape, (c_in,), (c_in,), (c_in,), pw_weight.shape, (c_out,), (c_out,), (c_out,), None]
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


# Input positions of joint_block_train that can take a gradient, in _GRAD_NAMES order.
_GRAD_POS = (0, 1, 2, 3, 4, 8, 9, 10, 11, 13)


def _setup_context(ctx, inputs, output):
    (x, dw_weight, dw_bias, mid_weight, mid_bias, mid_bn, mid_eps, mid_act, pw_weight, pw_bias, bn_weight, bn_bias,
     eps, residual, out_act, stride, padding, dilation) = inputs
    y, z, mean, var, mid_mean, mid_var = output
    ctx.save_for_backward(x, dw_weight, dw_bias, mid_weight, mid_bias, mid_mean, mid_var, pw_weight, bn_weight,
                          y, z, mean, var)
    ctx.args = (mid_bn, mid_eps, mid_act, eps, out_act, list(stride), list(padding), list(dilation))
    ctx.mark_non_differentiable(z, mean, var, mid_mean, mid_var)


def _backward(ctx, grad_y, *_unused):
    x, dw_weight, dw_bias, mid_weight, mid_bias, mid_mean, mid_var, pw_weight, bn_weight, y, z, mean, var = \
        ctx.saved_tensors
    mid_bn, mid_eps, mid_act, eps, out_act, stride, padding, dilation = ctx.args
    needs = [bool(ctx.needs_input_grad[i]) for i in _GRAD_POS]
    grads = [None] * 18
    if grad_y is None or not any(needs):
        return tuple(grads)
    result = joint_block_train_backward(grad_y, x, dw_weight, dw_bias, mid_weight, mid_bias, mid_mean, mid_var,
                                        mid_bn, mid_eps, mid_act, pw_weight, bn_weight, y, z, mean, var, eps,
                                        out_act, stride, padding, dilation, needs)
    for pos, need, g in zip(_GRAD_POS, needs, result):
        grads[pos] = g if need else None
    return tuple(grads)


joint_block_train.register_autograd(_backward, setup_context=_setup_context)


# ---- module-level entry: batch statistics + running-statistics updates -----------------------------
def uses_batch_stats(bn: Optional[nn.BatchNorm2d]) -> bool:
    """nn.BatchNorm2d normalises with batch statistics in training mode and whenever it tracks none."""
    return bn is not None and (bn.training or (bn.running_mean is None and bn.running_var is None))


def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
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
        unbiased = var.to(_STATS) * (count / max(count - 1, 1))
        if isinstance(factor, Tensor):
            bn.running_mean.copy_(bn.running_mean * (1 - factor) + mean.to(_STATS) * factor)
            bn.running_var.copy_(bn.running_var * (1 - factor) + unbiased * factor)
        else:
            bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def joint_block_training(block, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """JointBlock.forward when its BatchNorm layers use batch statistics (training mode)."""
    dw, pw, bn, mid_bn = block.depthwise, block.pointwise, block.bn, block.mid_bn
    out_h, out_w = _out_shape(x, dw.weight, pw.weight, residual, "none", "none", list(dw.stride), list(dw.padding),
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
    _update_running_stats(bn, mean, var, count)
    if mid_bn is not None:
        # mid BN normalises c + dw_bias: the bias shifts its mean, not its variance.
        _update_running_stats(mid_bn, mid_mean if dw.bias is None else mid_mean + dw.bias.detach(), mid_var, count)
    return y
