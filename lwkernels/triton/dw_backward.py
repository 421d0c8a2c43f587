"""Backward of the dilated, strided depthwise convolution as Triton kernels (the training op's CUDA
backward; see ops/training_reference.py).

With c = DW(x; stride S, padding P, dilation D), c[n, ch, oy, ox] = sum over taps (ky, kx) of
w[ch, ky, kx] * x[n, ch, oy*S - P + ky*D, ox*S - P + kx*D], and gc = dL/dc:

    grad x[n, ch, iy, ix] = sum over taps with iy + P - ky*D = oy*S (0 <= oy < OH), likewise x,
                            of w[ch, ky, kx] * gc[n, ch, oy, ox]          (_dw_grad_input_kernel)
    grad w[ch, ky, kx]    = sum over n, oy, ox of gc[n, ch, oy, ox] * x[n, ch, oy*S - P + ky*D, ...]
                                                                          (_dw_grad_weight_kernel)

grad x: one program per [BLOCK_P input pixels, BLOCK_C channels] tile gathers its taps (a pixel
receives from at most KH x KW outputs; the ones that are not on the stride grid or fall outside the
output are masked), so every element of grad x is written exactly once and no atomics are needed.
grad w: one program per [BLOCK_P output pixels, BLOCK_C channels] tile reduces its pixels for every
tap into a [pixel tiles, KH*KW, C] fp32 buffer, summed on the host in float64 (deterministic).

Pixels are flattened over (n, h, w); every tensor is addressed through its own strides (NCHW,
channels_last and views alike), with int64 address arithmetic. fp16/bf16 load and store in their own
dtype and accumulate in fp32. Under TRITON_INTERPRET=1 the kernels run on CPU tensors, which is how
tests/triton_train_interpreter_cases.py checks them without a GPU.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..ops.contract import empty_output
from .joint_block import INTERPRET, _check_blocks, _check_device_dtype, _check_grid, _on_device, _pair

#: Block sizes: 16 x 16 under the interpreter (fast there, and the smallest the GPU compiler takes),
#: 64 pixels x 32 channels on a GPU (both passes are memory-bound: no autotuning).
_DEFAULT_CONFIG: Dict[str, int] = ({"BLOCK_P": 16, "BLOCK_C": 16} if INTERPRET else {"BLOCK_P": 64, "BLOCK_C": 32})


@triton.jit
def _tile(pid, M, C, PLANE, ROW_W, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """A program's [BLOCK_P pixels, BLOCK_C channels] tile: pixels flattened over (n, row, column) of
    planes of PLANE = rows * ROW_W pixels; channel tiles of a pixel tile are launch neighbours.
    Returns (pixel tile index, pixel mask, n, row, column, channels (int64), channel mask)."""
    num_c = tl.cdiv(C, BLOCK_C)
    pid_c = pid % num_c
    pid_m = pid // num_c
    offs_m = pid_m.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = offs_m // PLANE
    r = offs_m - n * PLANE
    row = r // ROW_W
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    return pid_m, offs_m < M, n, row, r - row * ROW_W, offs_c, offs_c < C


@triton.jit
def _dw_grad_input_kernel(
    g_ptr, w_ptr, gx_ptr,
    M, HW, C, W, OH, OW,
    sgn, sgc, sgh, sgw, swc, swh, sww, sxn, sxc, sxh, sxw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    _, m_mask, n, ih, iw, offs_c, c_mask = _tile(tl.program_id(0), M, C, HW, W, BLOCK_P, BLOCK_C)
    g_pix = n * sgn
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(KH):
        # Output row oy receives this input row through tap kh when ih + P - kh*D == oy*S.
        num_h = ih + PAD_H - kh * DIL_H
        oy = num_h // STRIDE_H
        row_ok = m_mask & (num_h >= 0) & (oy * STRIDE_H == num_h) & (oy < OH)
        for kw in tl.static_range(KW):
            num_w = iw + PAD_W - kw * DIL_W
            ox = num_w // STRIDE_W
            ok = row_ok & (num_w >= 0) & (ox * STRIDE_W == num_w) & (ox < OW)
            g_off = (g_pix + oy * sgh + ox * sgw)[:, None] + (offs_c * sgc)[None, :]
            gv = tl.load(g_ptr + g_off, mask=ok[:, None] & c_mask[None, :], other=0.0)
            wv = tl.load(w_ptr + offs_c * swc + (kh * swh + kw * sww), mask=c_mask, other=0.0)
            acc += gv.to(tl.float32) * wv.to(tl.float32)[None, :]
    x_off = (n * sxn + ih * sxh + iw * sxw)[:, None] + (offs_c * sxc)[None, :]
    tl.store(gx_ptr + x_off, acc.to(gx_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])


@triton.jit
def _dw_grad_weight_kernel(
    g_ptr, x_ptr, part_ptr,
    M, OHW, C, H, W, OW,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m, m_mask, n, oy, ox, offs_c, c_mask = _tile(tl.program_id(0), M, C, OHW, OW, BLOCK_P, BLOCK_C)
    mc_mask = m_mask[:, None] & c_mask[None, :]
    g_off = (n * sgn + oy * sgh + ox * sgw)[:, None] + (offs_c * sgc)[None, :]
    gv = tl.load(g_ptr + g_off, mask=mc_mask, other=0.0).to(tl.float32)
    x_pix = n * sxn
    x_chan = (offs_c * sxc)[None, :]
    # Partials: [pixel tiles, KH*KW, C], row pid_m.
    part_row = part_ptr + pid_m * (KH * KW) * C
    for kh in tl.static_range(KH):
        iy = oy * STRIDE_H - PAD_H + kh * DIL_H
        row_ok = m_mask & (iy >= 0) & (iy < H)
        for kw in tl.static_range(KW):
            ix = ox * STRIDE_W - PAD_W + kw * DIL_W
            ok = row_ok & (ix >= 0) & (ix < W)
            xv = tl.load(x_ptr + (x_pix + iy * sxh + ix * sxw)[:, None] + x_chan,
                         mask=ok[:, None] & c_mask[None, :], other=0.0)
            tap_sum = tl.sum(gv * xv.to(tl.float32), axis=0)
            tl.store(part_row + (kh * KW + kw) * C + offs_c, tap_sum, mask=c_mask)


def depthwise_backward_triton(
    grad: torch.Tensor,
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    needs_input: bool = True,
    needs_weight: bool = True,
    *,
    config: Optional[Dict[str, int]] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad x, grad dw_weight) of c = DW(x) for grad = dL/dc, each None when not asked for.

    grad: [N, C, OH, OW]; x: [N, C, H, W]; dw_weight: [C, 1, KH, KW]; any strides. grad x has x's
    shape, dtype and memory format (contract.output_memory_format); grad dw_weight has dw_weight's
    shape and dtype. config: {"BLOCK_P", "BLOCK_C"[, "num_warps"]} (powers of two >= 16)."""
    _check_device_dtype(x)
    if grad.dim() != 4 or x.dim() != 4 or dw_weight.dim() != 4:
        raise ValueError("depthwise backward needs 4-d grad, x and dw_weight")
    n, c, h, w = x.shape
    if dw_weight.shape[0] != c or dw_weight.shape[1] != 1:
        raise ValueError(f"dw_weight must be [{c}, 1, kh, kw] for x with {c} channels, got {tuple(dw_weight.shape)}")
    if grad.shape[:2] != x.shape[:2]:
        raise ValueError(f"grad {tuple(grad.shape)} does not match x {tuple(x.shape)} in batch and channels")
    if grad.device != x.device or dw_weight.device != x.device:
        raise ValueError("grad, x and dw_weight must be on one device")
    kh, kw = int(dw_weight.shape[2]), int(dw_weight.shape[3])
    (sh, sw), (ph, pw), (dh, dwl) = _pair(stride), _pair(padding), _pair(dilation)
    oh, ow = grad.shape[2], grad.shape[3]
    if oh != (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1 or ow != (w + 2 * pw - dwl * (kw - 1) - 1) // sw + 1:
        raise ValueError(f"grad's spatial size {oh} x {ow} does not match the convolution of x {h} x {w}")
    cfg = {"num_warps": 4, "num_stages": 1, **_DEFAULT_CONFIG, **(config or {})}
    _check_blocks(cfg, ("BLOCK_P", "BLOCK_C"))
    geometry = (sh, sw, ph, pw, dh, dwl)

    grad_x = grad_w = None
    if needs_input:
        grad_x = empty_output(x, tuple(x.shape))
        m = n * h * w
        if m > 0:
            programs = triton.cdiv(m, cfg["BLOCK_P"]) * triton.cdiv(c, cfg["BLOCK_C"])
            _check_grid(programs)
            args = (grad, dw_weight, grad_x, m, h * w, c, w, oh, ow, *grad.stride(),
                    dw_weight.stride(0), dw_weight.stride(2), dw_weight.stride(3), *grad_x.stride(), *geometry)
            _on_device(x, lambda: _dw_grad_input_kernel[(programs,)](*args, KH=kh, KW=kw, **cfg))
    if needs_weight:
        m = n * oh * ow
        rows = triton.cdiv(m, cfg["BLOCK_P"])
        partials = torch.zeros(rows, kh * kw, c, dtype=torch.float32, device=x.device)
        if m > 0:
            programs = rows * triton.cdiv(c, cfg["BLOCK_C"])
            _check_grid(programs)
            args = (grad, x, partials, m, oh * ow, c, h, w, ow, *grad.stride(), *x.stride(), *geometry)
            _on_device(x, lambda: _dw_grad_weight_kernel[(programs,)](*args, KH=kh, KW=kw, **cfg))
        summed = partials.sum(0, dtype=torch.float64)  # [KH*KW, C]
        grad_w = summed.t().reshape(c, 1, kh, kw).to(dw_weight.dtype).contiguous()
    return grad_x, grad_w
