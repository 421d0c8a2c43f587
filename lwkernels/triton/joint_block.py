"""The fused joint block as one Triton kernel (the op's CUDA implementation).

One program computes an output tile of BLOCK_P pixels x BLOCK_CO output channels:

    for each chunk of BLOCK_CI input channels:
        t[P, CI] = sum over the kh x kw dilated taps of x[P, CI] * dw_weight[CI]    (fp32, masked at borders)
        t = mid_act(t * dw_scale + dw_shift)                                       (fp32)
        acc[P, CO] += dot(t as the compute dtype, pw_weight[CI, CO])               (fp32 accumulator)
    y = out_act(acc * pw_scale + pw_shift + residual)  -> stored in x's dtype

The depthwise intermediate lives only in registers; HBM sees x (plus halo re-reads, which hit L1/L2),
the weights, the optional residual, and y once.

Pixels are flattened over (n, oh, ow). Every tensor is addressed through its own strides, so NCHW,
channels_last and non-contiguous views need no copies; the output follows the input's memory format
(contract.output_memory_format). Tiles are laid out the way x is stored (CHANNELS_LAST): [pixels,
channels] with y = t @ pw for channels_last, [channels, pixels] with y^T = pw @ t^T otherwise, so a
warp's threads run along the contiguous dimension. Index arithmetic is int32 unless some pixel index
or offset may reach 2^31 (the launcher decides, INDEX_64); then the pixel index and every product of
an index with a stride are int64. docs/gpu.md says why (registers), with the resource report.

Precision: fp16/bf16 load and store in their own dtype and accumulate in fp32; the dot's operands are
the compute dtype. fp32 uses TF32 in the dot exactly when the caller says so (cuda_backend decides it
from PyTorch's cuDNN conv setting); otherwise "ieee" (full fp32). TF32 operands are rounded to nearest
first (_dot_operand): Triton's TF32 dot truncates them, which on an H200 gave 3-6 times the error the
TF32 rounding model allows.

Training (HAS_STATS, pointwise_stats_triton): the same kernel stores the pre-BN pointwise output z
and, in its epilogue, per-output-channel partial statistics of its pixel tile (sum and the sum of
squared deviations from the tile mean, plus the tile's pixel count) into [pixel tiles, C_out] fp32
buffers, merged on the host in float64 (combine_partials; deterministic, no atomics). Mid BatchNorm's
batch statistics come first from _depthwise_stats_kernel, which runs the same depthwise tile code
and stores only the partials; its scale/shift then enter the fused kernel as dw_scale/dw_shift.

Under TRITON_INTERPRET=1 the same kernel runs on CPU tensors with one pinned config (no autotuning),
which is how its logic is tested without a GPU.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..ops.contract import check_joint_args, empty_output

#: Interpreter mode is fixed when @triton.jit runs (at import), so read it the same way here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

#: dtypes the kernel computes in (anything else is the caller's business, see cuda_backend).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_ACT_CODES = {"none": 0, "relu": 1, "relu6": 2, "hardswish": 3, "silu": 4}

#: The one config used under the interpreter (and a good default for explicit launches). Every dot
#: dimension is >= 16, the GPU compiler's minimum, so the interpreter tests the tiling the GPU runs.
PINNED_CONFIG: Dict[str, int] = {"BLOCK_P": 16, "BLOCK_CO": 16, "BLOCK_CI": 16, "num_warps": 4, "num_stages": 1}


@triton.jit
def _activation(v, ACT: tl.constexpr):
    # tl.where keeps NaN (NaN < 0 is false), matching torch.relu / torch.clamp; tl.maximum might not.
    if ACT == 1:
        v = tl.where(v < 0.0, 0.0, v)
    elif ACT == 2:
        v = tl.where(v < 0.0, 0.0, v)
        v = tl.where(v > 6.0, 6.0, v)
    elif ACT == 3:  # hardswish: v * relu6(v + 3) / 6 (-inf gives NaN, as in PyTorch)
        r = v + 3.0
        r = tl.where(r < 0.0, 0.0, r)
        r = tl.where(r > 6.0, 6.0, r)
        v = v * r / 6.0
    elif ACT == 4:  # silu: v * sigmoid(v)
        v = v * tl.sigmoid(v)
    return v


@triton.jit
def _dot_operand(v, DOT_PRECISION: tl.constexpr):
    """v as the dot should read it. For a TF32 dot of fp32 operands: rounded to the nearest TF32 value
    (ties away from zero, as cvt.rna and cuDNN do), since the tensor cores would truncate the 13 low
    mantissa bits. Adding half a TF32 unit to the bits and clearing them is that rounding; NaNs, whose
    bits the addition could turn into an infinity or a zero, are kept as they are."""
    if DOT_PRECISION == "tf32":
        if v.dtype == tl.float32:
            bits = v.to(tl.int32, bitcast=True)
            rounded = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)  # -8192 == 0xFFFFE000
            v = tl.where(v == v, rounded, v)
    return v


@triton.jit
def _index(v, INDEX_64: tl.constexpr):
    """v in the kernel's index type: int64 when some offset may pass 2^31 (INDEX_64), else int32,
    which halves the registers every pixel and channel offset takes."""
    if INDEX_64:
        v = v.to(tl.int64)
    return v


@triton.jit
def _channel_vector(ptr, offs_c, c_mask, CHANNELS_LAST: tl.constexpr):
    """A per-channel vector as fp32, shaped to broadcast over a tile: [1, C] for [pixels, channels]
    tiles (CHANNELS_LAST), [C, 1] for [channels, pixels] tiles."""
    v = tl.load(ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    if CHANNELS_LAST:
        v = v[None, :]
    else:
        v = v[:, None]
    return v


@triton.jit
def _tile_offsets(pix, chan, CHANNELS_LAST: tl.constexpr):
    """pix [P] + chan [C] as a tile: [P, C] (CHANNELS_LAST) or [C, P]."""
    if CHANNELS_LAST:
        off = pix[:, None] + chan[None, :]
    else:
        off = chan[:, None] + pix[None, :]
    return off


@triton.jit
def _tile_mask(pix_ok, chan_ok, CHANNELS_LAST: tl.constexpr):
    """pix_ok [P] & chan_ok [C] as a tile: [P, C] (CHANNELS_LAST) or [C, P]."""
    if CHANNELS_LAST:
        ok = pix_ok[:, None] & chan_ok[None, :]
    else:
        ok = chan_ok[:, None] & pix_ok[None, :]
    return ok


@triton.jit
def _depthwise_tile(x_ptr, dw_w_ptr, x_pix, ih0, iw0, m_mask, offs_ci_i, ci_mask, H, W, sxc, sxh, sxw,
                    sdc, sdh, sdw, DIL_H, DIL_W,
                    KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr):
    """The raw depthwise output of a tile of BLOCK_P pixels x BLOCK_CI channels, fp32: [P, CI] when
    CHANNELS_LAST, else [CI, P]. The tile's last dimension is the one x is contiguous in, so the
    compiler spreads a warp's threads along it (coalesced, vectorised loads) and each thread holds
    few of the int64 pixel offsets, which are the bulk of the registers otherwise."""
    # k x k dilated taps, fp32 multiply-accumulate. Out-of-image taps, pixels past M and channels
    # past C_IN load 0 (zero padding), so they contribute nothing.
    x_chan = offs_ci_i * sxc  # [CI]
    if CHANNELS_LAST:
        t = tl.zeros((BLOCK_P, BLOCK_CI), dtype=tl.float32)
    else:
        t = tl.zeros((BLOCK_CI, BLOCK_P), dtype=tl.float32)
    # A loop, not unrolled: unrolled, the compiler issues every tap's loads (and holds their
    # addresses) at once and runs out of registers; one tap at a time, the latency is hidden by
    # the other resident warps instead.
    for tap in range(KH * KW):
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * DIL_H
        iw = iw0 + kw * DIL_W
        ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_off = _tile_offsets(x_pix + ih * sxh + iw * sxw, x_chan, CHANNELS_LAST)
        xv = tl.load(x_ptr + x_off, mask=_tile_mask(ok, ci_mask, CHANNELS_LAST), other=0.0)
        wv = _channel_vector(dw_w_ptr + kh * sdh + kw * sdw, offs_ci_i * sdc, ci_mask, CHANNELS_LAST)
        t += xv.to(tl.float32) * wv
    return t


@triton.jit
def _store_tile_stats(v, m_mask, offs_c, c_mask, pid_m, C, write_count, sum_ptr, m2_ptr, cnt_ptr,
                      CHANNELS_LAST: tl.constexpr):
    """Per-channel partial statistics of one pixel tile of v (fp32; [P, C] when CHANNELS_LAST, else
    [C, P]): the sum and the sum of squared deviations from the tile's own mean (M2) into row pid_m
    of the [rows, C] buffers, and the tile's pixel count into cnt[pid_m] (by one program per pixel
    tile: write_count).

    Centring per tile keeps the variance free of the E[v^2] - E[v]^2 cancellation; the host merges the
    rows in float64 (combine_partials), in a fixed order, so the result is deterministic."""
    valid = _tile_mask(m_mask, c_mask, CHANNELS_LAST)
    cnt = tl.sum(m_mask.to(tl.float32), axis=0)
    pixel_axis: tl.constexpr = 0 if CHANNELS_LAST else 1
    s = tl.sum(tl.where(valid, v, 0.0), axis=pixel_axis)
    mean = s / tl.maximum(cnt, 1.0)
    if CHANNELS_LAST:
        d = tl.where(valid, v - mean[None, :], 0.0)
    else:
        d = tl.where(valid, v - mean[:, None], 0.0)
    m2 = tl.sum(d * d, axis=pixel_axis)
    row = pid_m.to(tl.int64) * C
    tl.store(sum_ptr + row + offs_c, s, mask=c_mask)
    tl.store(m2_ptr + row + offs_c, m2, mask=c_mask)
    tl.store(cnt_ptr + pid_m, cnt, mask=write_count)


@triton.jit
def _joint_block_kernel(
    x_ptr, dw_w_ptr, dw_scale_ptr, dw_shift_ptr, pw_w_ptr, pw_scale_ptr, pw_shift_ptr, res_ptr, y_ptr,
    sum_ptr, m2_ptr, cnt_ptr,    # per-pixel-tile statistics of y (HAS_STATS only)
    M, OHW, C_IN, C_OUT, H, W, OW,
    sxn, sxc, sxh, sxw,          # x strides (elements)
    sdc, sdh, sdw,               # dw_weight strides: channel, kernel row, kernel column
    spo, spc,                    # pw_weight strides: out channel, in channel
    srn, src, srh, srw,          # residual strides (unused without residual)
    syn, syc, syh, syw,          # y strides
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    M_BUCKET,                    # autotune key only (not read)
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_DW_SCALE: tl.constexpr, HAS_DW_SHIFT: tl.constexpr, MID_ACT: tl.constexpr,
    HAS_PW_SCALE: tl.constexpr, HAS_PW_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, OUT_ACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_STATS: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    # Output-channel tiles of one pixel tile are neighbours in launch order, so when C_out is split
    # the input tile they all re-read (and recompute the depthwise part from) is still in L2.
    pid = tl.program_id(0)
    num_co = tl.cdiv(C_OUT, BLOCK_CO)
    pid_co = pid % num_co
    pid_m = pid // num_co

    # Pixel coordinates in the index type from the start: with INDEX_64, M = N * OH * OW may exceed
    # 2^31 and so may any index * stride below.
    offs_m = _index(pid_m, INDEX_64) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_mask = offs_m < M
    n = offs_m // OHW
    r = offs_m - n * OHW
    oh = r // OW
    ow = r - oh * OW
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    x_pix = n * sxn  # [P]

    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < C_OUT
    offs_co_i = _index(offs_co, INDEX_64)

    # The GEMM runs in the orientation of x's memory: y[P, CO] = t[P, CI] @ pw[CI, CO] for
    # channels_last, y^T[CO, P] = pw^T[CO, CI] @ t[CI, P] for NCHW (see _depthwise_tile).
    if CHANNELS_LAST:
        acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
    for c0 in range(0, C_IN, BLOCK_CI):
        offs_ci = c0 + tl.arange(0, BLOCK_CI)
        ci_mask = offs_ci < C_IN
        offs_ci_i = _index(offs_ci, INDEX_64)

        t = _depthwise_tile(x_ptr, dw_w_ptr, x_pix, ih0, iw0, m_mask, offs_ci_i, ci_mask, H, W, sxc, sxh, sxw,
                            sdc, sdh, sdw, DIL_H, DIL_W, KH, KW, BLOCK_P, BLOCK_CI, CHANNELS_LAST)
        # Masked channels stay exactly 0 through the affine (scale/shift load 0 there) and the
        # activation, and their pointwise rows load 0 too.
        if HAS_DW_SCALE:
            t = t * _channel_vector(dw_scale_ptr, offs_ci, ci_mask, CHANNELS_LAST)
        if HAS_DW_SHIFT:
            t = t + _channel_vector(dw_shift_ptr, offs_ci, ci_mask, CHANNELS_LAST)
        t = _activation(t, MID_ACT)

        # Pointwise on the tensor cores, operands in the compute dtype.
        if CHANNELS_LAST:
            w_off = offs_ci_i[:, None] * spc + offs_co_i[None, :] * spo
            pw = tl.load(pw_w_ptr + w_off, mask=ci_mask[:, None] & co_mask[None, :], other=0.0)
            acc = tl.dot(_dot_operand(t.to(pw.dtype), DOT_PRECISION), _dot_operand(pw, DOT_PRECISION), acc,
                         input_precision=DOT_PRECISION)
        else:
            w_off = offs_co_i[:, None] * spo + offs_ci_i[None, :] * spc
            pw = tl.load(pw_w_ptr + w_off, mask=co_mask[:, None] & ci_mask[None, :], other=0.0)
            acc = tl.dot(_dot_operand(pw, DOT_PRECISION), _dot_operand(t.to(pw.dtype), DOT_PRECISION), acc,
                         input_precision=DOT_PRECISION)

    # Epilogue: per-channel affine (folded BN + bias), residual, activation, one store.
    if HAS_PW_SCALE:
        acc = acc * _channel_vector(pw_scale_ptr, offs_co, co_mask, CHANNELS_LAST)
    if HAS_PW_SHIFT:
        acc = acc + _channel_vector(pw_shift_ptr, offs_co, co_mask, CHANNELS_LAST)
    out_mask = _tile_mask(m_mask, co_mask, CHANNELS_LAST)
    if HAS_RESIDUAL:
        r_off = _tile_offsets(n * srn + oh * srh + ow * srw, offs_co_i * src, CHANNELS_LAST)
        acc = acc + tl.load(res_ptr + r_off, mask=out_mask, other=0.0).to(tl.float32)
    acc = _activation(acc, OUT_ACT)
    y_off = _tile_offsets(n * syn + oh * syh + ow * syw, offs_co_i * syc, CHANNELS_LAST)
    yv = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + y_off, yv, mask=out_mask)
    if HAS_STATS:
        # Training: statistics of y exactly as stored (rounded to its dtype), for its BatchNorm.
        _store_tile_stats(yv.to(tl.float32), m_mask, offs_co, co_mask, pid_m, C_OUT, pid_co == 0,
                          sum_ptr, m2_ptr, cnt_ptr, CHANNELS_LAST)


@triton.jit
def _depthwise_stats_kernel(
    x_ptr, dw_w_ptr, sum_ptr, m2_ptr, cnt_ptr,
    M, OHW, C_IN, H, W, OW,
    sxn, sxc, sxh, sxw, sdc, sdh, sdw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
):
    """Per-channel partial statistics of the raw depthwise output (for mid BatchNorm in training),
    which is computed by the fused kernel's own depthwise code and never stored. One program per
    [BLOCK_P pixels, BLOCK_CI channels] tile; channel tiles of a pixel tile are launch neighbours."""
    pid = tl.program_id(0)
    num_ci = tl.cdiv(C_IN, BLOCK_CI)
    pid_ci = pid % num_ci
    pid_m = pid // num_ci
    offs_m = _index(pid_m, INDEX_64) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_mask = offs_m < M
    n = offs_m // OHW
    r = offs_m - n * OHW
    oh = r // OW
    ow = r - oh * OW
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_mask = offs_ci < C_IN
    t = _depthwise_tile(x_ptr, dw_w_ptr, n * sxn, oh * STRIDE_H - PAD_H, ow * STRIDE_W - PAD_W, m_mask,
                        _index(offs_ci, INDEX_64), ci_mask, H, W, sxc, sxh, sxw, sdc, sdh, sdw, DIL_H, DIL_W,
                        KH, KW, BLOCK_P, BLOCK_CI, CHANNELS_LAST)
    _store_tile_stats(t, m_mask, offs_ci, ci_mask, pid_m, C_IN, pid_ci == 0, sum_ptr, m2_ptr, cnt_ptr,
                      CHANNELS_LAST)


# -- autotuning ----------------------------------------------------------------------------------

#: (BLOCK_P, BLOCK_CO, num_warps) of the candidate tiles: for each C_out tile width 32..256, the
#: full width at one or two pixel counts, at about one warp per 512 fp32 accumulator elements (at most
#: 16-32 accumulator registers per thread). Every one compiles without spills and with >= 8 resident
#: warps per SM in every dtype, layout and epilogue, on Triton 3.6 and 3.9 (benchmarks/
#: resource_report.py). 64 x 256 is not among them: at 16 warps (512 threads, so at most 128
#: registers each) Triton 3.6's code for it spills, so 256-wide tiles take 32 pixels on 8 warps.
_TILES = ((64, 32, 4), (128, 32, 8), (64, 64, 8), (128, 64, 16), (64, 128, 16), (32, 128, 8), (32, 256, 8))
_TILE_WARPS = {(p, co): w for p, co, w in _TILES}


def tile_config(block_p: int, block_co: int, block_ci: int, num_stages: int = 1) -> triton.Config:
    """A launch config: a candidate tile's own warp count, else one warp per 512 fp32 accumulator
    elements (4 to 16), which keeps the accumulator at 16 registers per thread or fewer."""
    warps = _TILE_WARPS.get((block_p, block_co), max(4, min(16, block_p * block_co // 512)))
    return triton.Config({"BLOCK_P": block_p, "BLOCK_CO": block_co, "BLOCK_CI": block_ci},
                         num_warps=warps, num_stages=num_stages)


def _candidate_configs() -> List[triton.Config]:
    """Every config autotuning may time: the _TILES x in-channel chunk {16, 32}, one stage each.
    `select_configs` keeps at most 6 of them for a given shape.

    One stage: the channel loop holds the (deliberately not unrolled) tap loop, and Triton's
    pipeliner does not pipeline a loop that contains another, so num_stages > 1 would compile to the
    same code; the loads' latency is hidden by the 8-32 warps each SM keeps resident instead."""
    return [tile_config(p, co, ci) for p, co, _ in _TILES for ci in (16, 32)]


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def select_configs(c_in: int, c_out: int) -> Tuple[Tuple[int, int, int, int], ...]:
    """The (BLOCK_P, BLOCK_CO, BLOCK_CI, num_stages) worth timing for a shape (at most 6).

    BLOCK_CO: the smallest power of two covering C_out (capped at 256, floor 32), so the input is read
    and the depthwise part computed once per pixel tile when C_out <= 256: every candidate tile of that
    width, plus half of it at 64 pixels (twice the programs, for shapes with few pixels). BLOCK_CI: 16
    for C_in <= 16 (the dot's minimum K), else 16 and 32."""
    co_full = min(256, max(32, _next_pow2(c_out)))
    pairs = [(p, co) for p, co, _ in _TILES if co == co_full]
    if co_full > 32:
        pairs.append((64, co_full // 2))
    chunks = (16,) if c_in <= 16 else (16, 32)
    return tuple((p, co, ci, 1) for p, co in pairs for ci in chunks)


def _prune(configs, named_args, **kwargs):
    wanted = set(select_configs(named_args["C_IN"], named_args["C_OUT"]))
    kept = [c for c in configs
            if (c.kwargs["BLOCK_P"], c.kwargs["BLOCK_CO"], c.kwargs["BLOCK_CI"], c.num_stages) in wanted]
    return kept or configs[:1]


_joint_block_autotuned = triton.autotune(
    configs=_candidate_configs(),
    key=["C_IN", "C_OUT", "KH", "KW", "STRIDE_H", "STRIDE_W", "M_BUCKET", "CHANNELS_LAST"],
    prune_configs_by={"early_config_prune": _prune},
)(_joint_block_kernel)

#: The same kernel with the statistics epilogue (training). Its own autotuner: timing candidates
#: writes partial rows for their own BLOCK_P, so the buffers are zeroed after benchmarking
#: (reset_to_zero) and only the chosen config's rows remain (the others keep count 0).
_joint_block_stats_autotuned = triton.autotune(
    configs=_candidate_configs(),
    key=["C_IN", "C_OUT", "KH", "KW", "STRIDE_H", "STRIDE_W", "M_BUCKET", "CHANNELS_LAST"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["sum_ptr", "m2_ptr", "cnt_ptr"],
)(_joint_block_kernel)


# -- launcher ------------------------------------------------------------------------------------

def _pair(v: Sequence[int]) -> Tuple[int, int]:
    a, b = v
    return int(a), int(b)


def joint_block_triton(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_scale: Optional[torch.Tensor],
    dw_shift: Optional[torch.Tensor],
    mid_act: str,
    pw_weight: torch.Tensor,
    pw_scale: Optional[torch.Tensor],
    pw_shift: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    out_act: str,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    *,
    allow_tf32: bool = False,
    config: Optional[Dict[str, int]] = None,
) -> torch.Tensor:
    """Run the fused Triton kernel: joint_block's arguments, in its order.

    allow_tf32: fp32 inputs use TF32 in the pointwise dot (ignored for fp16/bf16).
    config: {"BLOCK_P", "BLOCK_CO", "BLOCK_CI"[, "num_warps", "num_stages"]} to bypass autotuning, e.g.
    tile_config(...).all_kwargs() (tests use it to check every tile); under TRITON_INTERPRET=1 the
    pinned config is the default.

    CUDA tensors normally; CPU tensors only under TRITON_INTERPRET=1.
    """
    out_shape = check_joint_args(x, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, pw_scale, pw_shift,
                                 residual, out_act, stride, padding, dilation)
    y, _ = _run_joint(out_shape, x, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, pw_scale, pw_shift, residual,
                      out_act, stride, padding, dilation, allow_tf32=allow_tf32, config=config, stats=False)
    return y


def pointwise_stats_triton(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_scale: Optional[torch.Tensor],
    dw_shift: Optional[torch.Tensor],
    mid_act: str,
    pw_weight: torch.Tensor,
    pw_bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    *,
    allow_tf32: bool = False,
    config: Optional[Dict[str, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training forward's heavy part in one launch: z = PW(mid_act(dw_scale * DW(x) + dw_shift)) +
    pw_bias (the fused kernel, no residual, no output activation), plus the batch statistics of z that
    its BatchNorm needs, from the kernel's epilogue. Returns (z, mean, var): z in x's dtype and memory
    format, mean/var the biased per-output-channel statistics in float64 (of z as stored).

    The depthwise output never reaches memory; the statistics cost a [pixel tiles, C_out] fp32 buffer
    per sum and M2, merged on the host in float64 (deterministic: no atomics). Other arguments as
    joint_block_triton; mid BatchNorm in training passes its batch-statistics scale/shift as
    dw_scale/dw_shift (see depthwise_stats_triton), which may be fp32 whatever x's dtype (the kernel
    reads every per-channel vector as fp32)."""
    out_shape = check_joint_args(x, dw_weight, _checked_as_x(dw_scale, x), _checked_as_x(dw_shift, x), mid_act,
                                 pw_weight, None, pw_bias, None, "none", stride, padding, dilation)
    z, partials = _run_joint(out_shape, x, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, None, pw_bias, None,
                             "none", stride, padding, dilation, allow_tf32=allow_tf32, config=config, stats=True)
    c_out = z.shape[1]
    if partials is None:
        nan = torch.full((c_out,), float("nan"), dtype=torch.float64, device=z.device)
        return z, nan, nan.clone()
    return (z, *combine_partials(*partials))


def depthwise_stats_triton(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    *,
    config: Optional[Dict[str, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Biased per-channel batch statistics (mean, var; float64) of the raw depthwise output DW(x),
    computed tile by tile with the fused kernel's depthwise code and never stored.

    config: {"BLOCK_P", "BLOCK_CI"[, "num_warps", "num_stages"]}; default 64 x (16 or 32) on a GPU (a
    memory-bound pass: no autotuning), the pinned 16 x 16 under the interpreter."""
    c_in = x.shape[1]
    out_shape = check_joint_args(x, dw_weight, None, None, "none", x.new_empty(c_in, c_in, 1, 1), None, None, None,
                                 "none", stride, padding, dilation)
    _check_device_dtype(x)
    n, _, h, w = x.shape
    out_h, out_w = out_shape[2:]
    m = n * out_h * out_w
    if m == 0:
        nan = torch.full((c_in,), float("nan"), dtype=torch.float64, device=x.device)
        return nan, nan.clone()
    if config is None:
        config = ({"BLOCK_P": PINNED_CONFIG["BLOCK_P"], "BLOCK_CI": PINNED_CONFIG["BLOCK_CI"]} if INTERPRET
                  else {"BLOCK_P": 64, "BLOCK_CI": 16 if c_in <= 16 else 32})
    cfg = {"num_warps": 4, "num_stages": 1, **config}
    _check_blocks(cfg, ("BLOCK_P", "BLOCK_CI"))
    rows = triton.cdiv(m, cfg["BLOCK_P"])
    programs = rows * triton.cdiv(c_in, cfg["BLOCK_CI"])
    _check_grid(programs)
    s, m2, cnt = _partial_buffers(rows, c_in, x.device)
    kh, kw = int(dw_weight.shape[2]), int(dw_weight.shape[3])
    args = (x, dw_weight, s, m2, cnt, m, out_h * out_w, c_in, h, w, out_w, *x.stride(),
            dw_weight.stride(0), dw_weight.stride(2), dw_weight.stride(3),
            *_pair(stride), *_pair(padding), *_pair(dilation))
    index_64 = _needs_int64(m, (x, dw_weight), _index_margin(dw_weight, padding, dilation, cfg["BLOCK_P"]))
    _on_device(x, lambda: _depthwise_stats_kernel[(programs,)](*args, KH=kh, KW=kw, CHANNELS_LAST=_tiles_channels_last(x),
                                                               INDEX_64=index_64, **cfg))
    return combine_partials(s, m2, cnt)


def combine_partials(s: torch.Tensor, m2: torch.Tensor, cnt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge per-tile (sum [R, C], M2 [R, C], count [R]) rows into the biased (mean, var) [C] in
    float64 (Chan et al.'s pairwise update, all rows at once). Rows with count 0 contribute nothing."""
    s, m2, cnt = s.double(), m2.double(), cnt.double()[:, None]
    total = cnt.sum()
    mean = s.sum(0) / total
    between = (cnt * (s / cnt.clamp_min(1) - mean) ** 2).sum(0)
    return mean, (m2.sum(0) + between) / total


def _partial_buffers(rows: int, channels: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    buf = torch.zeros(2, rows, channels, dtype=torch.float32, device=device)
    return buf[0], buf[1], torch.zeros(rows, dtype=torch.float32, device=device)


def _check_device_dtype(x: torch.Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton kernel computes in {KERNEL_DTYPES}, got x of dtype {x.dtype}")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton kernel needs CUDA tensors (x is on {x.device}); "
                         "CPU tensors run it only under TRITON_INTERPRET=1")


def _check_blocks(cfg: Dict[str, int], keys) -> None:
    for key in keys:
        if cfg[key] < 16 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"{key} must be a power of two >= 16, got {cfg[key]}")


def _on_device(x: torch.Tensor, launch) -> None:
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):  # Triton launches on the current device's current stream
            launch()
    else:
        launch()


def _checked_as_x(v: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """An fp32 per-channel vector as check_joint_args should see it next to a lower-precision x: its
    shape and device, in x's dtype (an empty stand-in: no copy, no kernel launch per training step)."""
    return torch.empty_like(v, dtype=x.dtype) if v is not None and v.dtype == torch.float32 else v


def _run_joint(out_shape, x, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, pw_scale, pw_shift, residual,
               out_act, stride, padding, dilation, *, allow_tf32: bool, config: Optional[Dict[str, int]],
               stats: bool):
    """Launch the fused kernel on arguments check_joint_args accepted (out_shape is its answer);
    returns (y, partial-statistics buffers or None)."""
    _check_device_dtype(x)
    y = empty_output(x, out_shape)
    if y.numel() == 0:
        return y, None

    n, c_in, h, w = x.shape
    _, c_out, out_h, out_w = out_shape
    kh, kw = int(dw_weight.shape[2]), int(dw_weight.shape[3])
    stride_h, stride_w = _pair(stride)
    pad_h, pad_w = _pair(padding)
    dil_h, dil_w = _pair(dilation)
    m = n * out_h * out_w

    if config is None and INTERPRET:
        config = PINNED_CONFIG
    cfg = None
    if config is not None:
        cfg = {"num_warps": 4, "num_stages": 1, **config}
        _check_blocks(cfg, ("BLOCK_P", "BLOCK_CO", "BLOCK_CI"))

    # Per-channel vectors are tiny: make them dense so the kernel indexes them with stride 1.
    vectors = [None if v is None else v.contiguous() for v in (dw_scale, dw_shift, pw_scale, pw_shift)]
    dummy = y  # any pointer of the right device for absent operands (never dereferenced)
    res = residual if residual is not None else dummy
    # Statistics rows: one per pixel tile of the launch, whichever candidate autotuning picks.
    partials = (_partial_buffers(launch_pixel_tiles(m, c_in, c_out, cfg), c_out, x.device)
                if stats else (dummy, dummy, dummy))
    dot_precision = "tf32" if (x.dtype != torch.float32 or allow_tf32) else "ieee"
    # fp16/bf16 dots ignore input_precision; "tf32" there is Triton's default, i.e. the usual path.

    args = (
        x, dw_weight, *(v if v is not None else dummy for v in vectors[:2]), pw_weight,
        *(v if v is not None else dummy for v in vectors[2:]), res, y, *partials,
        m, out_h * out_w, c_in, c_out, h, w, out_w,
        *x.stride(),
        dw_weight.stride(0), dw_weight.stride(2), dw_weight.stride(3),
        pw_weight.stride(0), pw_weight.stride(1),
        *(res.stride() if residual is not None else (0, 0, 0, 0)),
        *y.stride(),
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        _next_pow2(m),
    )
    meta = dict(
        KH=kh, KW=kw,
        HAS_DW_SCALE=vectors[0] is not None, HAS_DW_SHIFT=vectors[1] is not None, MID_ACT=_ACT_CODES[mid_act],
        HAS_PW_SCALE=vectors[2] is not None, HAS_PW_SHIFT=vectors[3] is not None,
        HAS_RESIDUAL=residual is not None, OUT_ACT=_ACT_CODES[out_act],
        DOT_PRECISION=dot_precision, HAS_STATS=stats, CHANNELS_LAST=_tiles_channels_last(x),
        INDEX_64=_needs_int64(m, (x, dw_weight, pw_weight, residual, y),
                              _index_margin(dw_weight, padding, dilation, _MAX_BLOCK_P)),
    )

    if cfg is not None:
        programs = triton.cdiv(m, cfg["BLOCK_P"]) * triton.cdiv(c_out, cfg["BLOCK_CO"])
        _check_grid(programs)
        launch = lambda: _joint_block_kernel[(programs,)](*args, **meta, **cfg)  # noqa: E731
    else:
        _check_grid(max(triton.cdiv(m, p) * triton.cdiv(c_out, co) for p, co, _, _ in select_configs(c_in, c_out)))
        kernel = _joint_block_stats_autotuned if stats else _joint_block_autotuned

        def grid(meta_):
            return (triton.cdiv(m, meta_["BLOCK_P"]) * triton.cdiv(c_out, meta_["BLOCK_CO"]),)

        launch = lambda: kernel[grid](*args, **meta)  # noqa: E731

    _on_device(x, launch)
    return y, (partials if stats else None)


def launch_pixel_tiles(m: int, c_in: int, c_out: int, cfg: Optional[Dict[str, int]]) -> int:
    """Pixel tiles (program rows) of a launch over m output pixels: cfg's, or without one the most that
    any candidate autotuning may time for this shape, since a buffer with a row per pixel tile must
    hold the rows of every candidate (the 32-pixel tiles of wide C_out have twice a 64-pixel one's)."""
    if cfg is not None:
        return triton.cdiv(m, cfg["BLOCK_P"])
    return max(triton.cdiv(m, p) for p, _, _, _ in select_configs(c_in, c_out))


def _needs_int64(m: int, tensors, margin: int) -> bool:
    """Whether the kernels must index in int64: some pixel index or element offset they compute may
    reach 2^31. Offsets are bounded per tensor by sum over dims of (size + margin) * |stride|, where
    margin covers the coordinates that masked lanes compute past the edges (padding, dilated taps,
    the pixels of a last partial tile)."""
    limit = 2 ** 31 - 1
    if m + margin >= limit:
        return True
    for t in tensors:
        if t is not None and sum((size + margin) * abs(st) for size, st in zip(t.shape, t.stride())) >= limit:
            return True
    return False


def _index_margin(dw_weight: torch.Tensor, padding, dilation, block_p: int) -> int:
    (ph, pw), (dh, dwl) = _pair(padding), _pair(dilation)
    return block_p + max(ph, pw) + max(dh, dwl) * max(int(dw_weight.shape[2]), int(dw_weight.shape[3])) + 1


#: The largest BLOCK_P any config uses (bounds the pixels a last partial tile computes past M).
_MAX_BLOCK_P = 256


def _tiles_channels_last(x: torch.Tensor) -> bool:
    """Whether the kernels tile x as [pixels, channels] (channels contiguous, as channels_last stores
    them) rather than [channels, pixels]. Either is correct for any strides; this one reads x along
    its unit stride."""
    return bool(x.stride(1) == 1 and x.shape[1] > 1)


def _check_grid(programs: int) -> None:
    if programs >= 2 ** 31:
        raise ValueError(f"output too large for one launch ({programs} tiles; the grid limit is 2^31 - 1)")
