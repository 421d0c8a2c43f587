"""The training op's Triton kernels on the CPU under Triton's interpreter (TRITON_INTERPRET=1): the
fused depthwise -> pointwise kernel with its statistics epilogue (pointwise_stats_triton: z and the
batch statistics of z), the depthwise statistics pass for mid BatchNorm (depthwise_stats_triton),
the depthwise backward (triton_dw_backward: grad input and grad weight), and the training op's CUDA
forward and backward (triton.training.forward, training_reference.backward with the Triton depthwise
backward) run end to end on CPU tensors, against float64 compositions.

Run by test_triton_interpreter.py in a fresh pytest process with TRITON_INTERPRET=1 (see
triton_interpreter_cases.py); by hand: TRITON_INTERPRET=1 pytest tests/triton_train_interpreter_cases.py
"""
from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported (test_triton_interpreter.py does that)",
                allow_module_level=True)
pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from helpers import Case  # noqa: E402
from lwkernels.ops import training, training_reference  # noqa: E402
from lwkernels.ops.args import GRAD_NAMES, TrainArgs, TrainSaved  # noqa: E402
from lwkernels.triton import training as triton_training  # noqa: E402
from lwkernels.ops.activation import apply_activation  # noqa: E402
from lwkernels.ops.contract import output_memory_format  # noqa: E402
from lwkernels.triton.dw_backward import depthwise_backward_triton  # noqa: E402
from lwkernels.triton.joint_block import combine_partials, depthwise_stats_triton, pointwise_stats_triton  # noqa: E402
from triton_helpers import assert_matches_lowp_rule, make_case_args, poison_kernel_outputs  # noqa: E402

U32 = 2.0 ** -24
U16 = 2.0 ** -11  # fp16's unit roundoff: one rounding of a stored result


@pytest.fixture
def nan_outputs(monkeypatch):
    poison_kernel_outputs(monkeypatch)


pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("nan_outputs")]

#: z-path cases: C = 1, 3, 17, 33 (partial and several channel tiles), stride 2, dilation 2/3, H or
#: W below the dilated kernel, with and without the depthwise affine (mid BN's scale/shift slot).
Z_CASES = (
    Case(n=2, c_in=17, c_out=19, h=9, w=7, stride=2, dilation=2, mid_act="relu", out_act="none", pw_scale=False),
    Case(n=1, c_in=3, c_out=17, h=7, w=8, dilation=3, mid_act="relu6", out_act="none", pw_scale=False),
    Case(n=2, c_in=1, c_out=3, h=5, w=6, stride=2, dilation=3, out_act="none", pw_scale=False),
    Case(n=1, c_in=33, c_out=1, h=5, w=4, dilation=2, out_act="none", pw_scale=False, dw_scale=False,
         dw_shift=False, pw_shift=False),
)


def _z_args(case, dtype, layout):
    args = make_case_args(case, dtype, layout)
    x, dw, dw_scale, dw_shift, mid_act, pw, pw_scale, pw_bias, res, out_act, stride, padding, dilation = args
    assert pw_scale is None and res is None and out_act == "none"
    return args, (x, dw, dw_scale, dw_shift, mid_act, pw, pw_bias, stride, padding, dilation)


def _assert_stats(mean, var, v, tol_mean, tol_var, what):
    """mean/var (float64, [C]) against the float64 batch statistics of v [N, C, H, W]."""
    v = v.double()
    ref_mean, ref_var = v.mean((0, 2, 3)), v.var((0, 2, 3), unbiased=False)
    assert mean.dtype == var.dtype == torch.float64 and mean.shape == ref_mean.shape
    assert torch.isfinite(mean).all() and torch.isfinite(var).all(), f"{what}: non-finite statistics"
    err_m, err_v = (mean - ref_mean).abs(), (var - ref_var).abs()
    assert (err_m <= tol_mean).all(), f"{what} mean: error {err_m.max():.3e}, allowed {tol_mean.min():.3e}"
    assert (err_v <= tol_var).all(), f"{what} var: error {err_v.max():.3e}, allowed {tol_var.min():.3e}"


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", Z_CASES, ids=str)
def test_pointwise_with_statistics(case, dtype, layout):
    args, call = _z_args(case, dtype, layout)
    z, mean, var = pointwise_stats_triton(*call)
    assert_matches_lowp_rule(z, args)  # z itself: the fused kernel's rule (layout, dtype, every element)
    # The epilogue's statistics are those of z as stored: fp32 tile partials merged in float64.
    zd = z.double()
    scale = zd.abs().mean((0, 2, 3))
    tol = 64 * U32 * scale
    _assert_stats(mean, var, z, tol, 2 * tol * (scale + zd.std((0, 2, 3))), "z")


def test_statistics_with_other_tilings():
    """Several pixel tiles per launch with partial last tiles (BLOCK_P 32 vs 16) and two channel tiles."""
    case = Case(n=2, c_in=20, c_out=35, h=9, w=11, stride=2, dilation=2, mid_act="relu", out_act="none",
                pw_scale=False)
    args, call = _z_args(case, torch.float32, "nhwc")
    z1, m1, v1 = pointwise_stats_triton(*call, config={"BLOCK_P": 32, "BLOCK_CO": 16, "BLOCK_CI": 32})
    z2, m2, v2 = pointwise_stats_triton(*call)
    assert_matches_lowp_rule(z1, args)
    torch.testing.assert_close(z1, z2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m1, m2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=1e-7)


def test_combine_partials_is_chan_merge():
    gen = torch.Generator().manual_seed(0)
    v = 100 + torch.randn(37, 5, generator=gen, dtype=torch.float64)  # large mean: no E[v^2] - E[v]^2
    rows = [v[i:i + 16] for i in range(0, 37, 16)] + [v[:0]]           # partial last tile, one empty row
    s = torch.stack([r.sum(0) for r in rows]).float()
    m2 = torch.stack([((r - r.mean(0)) ** 2).sum(0) if len(r) else torch.zeros(5, dtype=torch.float64)
                      for r in rows]).float()
    cnt = torch.tensor([float(len(r)) for r in rows])
    mean, var = combine_partials(s, m2, cnt)
    torch.testing.assert_close(mean, v.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(var, v.var(0, unbiased=False), rtol=1e-5, atol=0)


def _depthwise_inputs(case, dtype, layout):
    """(x, dw_weight, stride, padding, dilation) of the case's op arguments."""
    args = make_case_args(case, dtype, layout)
    return args[0], args[1], args[10], args[11], args[12]


DW_CASES = (
    Case(n=2, c_in=17, c_out=1, h=9, w=7, stride=2, dilation=2),
    Case(n=1, c_in=3, c_out=1, h=5, w=6, dilation=3),         # W below the dilated kernel (7)
    Case(n=3, c_in=1, c_out=1, h=7, w=7, kernel=5, stride=2, dilation=1),
    Case(n=1, c_in=33, c_out=1, h=6, w=5, kernel=(3, 5), dilation=(2, 1), padding=(2, 2)),
)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", DW_CASES, ids=str)
def test_depthwise_statistics(case, dtype, layout):
    x, dw, stride, padding, dilation = _depthwise_inputs(case, dtype, layout)
    mean, var = depthwise_stats_triton(x, dw, stride, padding, dilation)
    c = F.conv2d(x.double(), dw.double(), None, stride, padding, dilation, groups=x.shape[1])
    bound = F.conv2d(x.double().abs(), dw.double().abs(), None, stride, padding, dilation, groups=x.shape[1])
    k = dw.shape[2] * dw.shape[3] + 64  # fp32 taps, then fp32 tile sums
    scale = bound.mean((0, 2, 3))
    _assert_stats(mean, var, c, k * U32 * scale, 4 * k * U32 * (bound ** 2).mean((0, 2, 3)), "depthwise")


# -- the depthwise backward ------------------------------------------------------------------------------
#: DW_CASES plus stride 3 with dilation 2 (output positions that no tap of some input pixel hits).
DW_BACKWARD_CASES = DW_CASES + (Case(n=2, c_in=18, c_out=1, h=10, w=11, stride=3, dilation=2, padding=1),)


def _bn_parameters(c_in, c_out, gen):
    """(mid_weight, mid_bias, bn_weight, bn_bias): affine parameters near BatchNorm's initial ones."""
    return (1 + 0.2 * torch.randn(c_in, generator=gen), 0.2 * torch.randn(c_in, generator=gen),
            1 + 0.2 * torch.randn(c_out, generator=gen), 0.2 * torch.randn(c_out, generator=gen))


def _dw_backward_reference(g, x, dw, stride, padding, dilation):
    """float64 (grad x, grad w) and the same convolutions of |g|, |x|, |w| (rounding-error scales)."""
    def grads(g_, x_, w_):
        gx, gw, _ = torch.ops.aten.convolution_backward(g_, x_, w_, None, list(stride), list(padding),
                                                        list(dilation), False, [0, 0], x_.shape[1],
                                                        [True, True, False])
        return gx, gw
    d = lambda t: t.double().contiguous()  # noqa: E731
    return grads(d(g), d(x), d(dw)), grads(d(g).abs(), d(x).abs(), d(dw).abs())


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", DW_BACKWARD_CASES, ids=str)
def test_depthwise_backward(case, dtype, layout):
    x, dw, stride, padding, dilation = _depthwise_inputs(case, dtype, layout)
    out = F.conv2d(x.double(), dw.double(), None, stride, padding, dilation, groups=x.shape[1])
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(out.shape, generator=gen).to(dtype).contiguous(memory_format=output_memory_format(x))
    gx, gw = depthwise_backward_triton(g, x, dw, stride, padding, dilation)
    (gx_ref, gw_ref), (gx_bound, gw_bound) = _dw_backward_reference(g, x, dw, stride, padding, dilation)
    assert gx.shape == x.shape and gx.dtype == x.dtype and gx.is_contiguous(memory_format=output_memory_format(x))
    assert gw.shape == dw.shape and gw.dtype == dw.dtype
    taps = dw.shape[2] * dw.shape[3]
    # fp32 accumulation of at most `taps` products (grad x) or of a tile's pixels then float64 (grad w),
    # then one rounding to the stored dtype: relative, or half of fp16's subnormal spacing (2^-24).
    store, floor = (U16, 2.0 ** -25) if dtype == torch.float16 else (U32, 2.0 ** -150)
    tol_x = taps * U32 * gx_bound + store * gx_ref.abs() + floor
    tol_w = 64 * U32 * gw_bound + store * gw_ref.abs() + floor
    err_x, err_w = (gx.double() - gx_ref).abs(), (gw.double() - gw_ref).abs()
    assert torch.isfinite(gx).all(), "grad x: non-finite (an input pixel the kernel did not write?)"
    assert (err_x <= tol_x).all(), f"grad x: error {err_x.max():.3e}"
    assert (err_w <= tol_w).all(), f"grad w: error {err_w.max():.3e}"


def test_depthwise_backward_options():
    """needs flags, a larger pixel tile (several partial tiles) and a non-contiguous grad view."""
    case = Case(n=2, c_in=20, c_out=1, h=9, w=11, stride=2, dilation=2)
    x, dw, stride, padding, dilation = _depthwise_inputs(case, torch.float32, "nchw")
    out_shape = F.conv2d(x, dw, None, stride, padding, dilation, groups=x.shape[1]).shape
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(out_shape[0], out_shape[2], out_shape[3], out_shape[1], generator=gen).permute(0, 3, 1, 2)
    gx_only, none_w = depthwise_backward_triton(g, x, dw, stride, padding, dilation, needs_weight=False)
    none_x, gw_only = depthwise_backward_triton(g, x, dw, stride, padding, dilation, needs_input=False)
    assert none_w is None and none_x is None
    gx, gw = depthwise_backward_triton(g, x, dw, stride, padding, dilation, config={"BLOCK_P": 32, "BLOCK_C": 32})
    (gx_ref, gw_ref), _ = _dw_backward_reference(g, x, dw, stride, padding, dilation)
    for got in (gx_only, gx):
        torch.testing.assert_close(got.double(), gx_ref, rtol=1e-5, atol=1e-5)
    for got in (gw_only, gw):
        torch.testing.assert_close(got.double(), gw_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        depthwise_backward_triton(g[:, :, :-1], x, dw, stride, padding, dilation)
    with pytest.raises(ValueError, match="power of two"):
        depthwise_backward_triton(g, x, dw, stride, padding, dilation, config={"BLOCK_P": 24})


@pytest.mark.parametrize("mid_bn,layout,case", [
    (True, "nhwc", Case(n=2, c_in=17, c_out=5, h=9, w=7, stride=2, dilation=2, mid_act="relu", out_act="relu")),
    (False, "nchw", Case(n=2, c_in=3, c_out=17, h=7, w=8, dilation=3, mid_act="relu6", out_act="relu6")),
], ids=str)
def test_training_backward_end_to_end(mid_bn, layout, case):
    """training_reference.backward (joint_block_train_backward's CUDA path) with the Triton depthwise
    backward against the same function with aten's, on CPU tensors, float32: every gradient."""
    gen = torch.Generator().manual_seed(4)
    args = make_case_args(case, torch.float32, layout)
    x, dw, _, dw_bias, mid_act, pw, _, pw_b, _, out_act, stride, padding, dilation = args
    mid_w, mid_b, bn_w, _ = _bn_parameters(x.shape[1], pw.shape[0], gen)
    y, z, mean, var, mid_mean, mid_var = training_reference.forward(TrainArgs(
        x, dw, dw_bias, mid_w, mid_b, mid_bn, 1e-5, mid_act, pw, pw_b, bn_w, None, 1e-5, None, out_act, stride,
        padding, dilation))
    grad_y = torch.randn(y.shape, generator=gen).contiguous(memory_format=output_memory_format(x))
    common = (grad_y, TrainSaved(x, dw, dw_bias, mid_w, mid_b, mid_mean, mid_var, mid_bn, 1e-5, mid_act, pw, bn_w,
                                 None, None, y, z, mean, var, 1e-5, out_act, stride, padding, dilation), [True] * 10)
    got = training_reference.backward(*common, triton_depthwise=True)
    ref = training_reference.backward(*common, triton_depthwise=False)
    for name, gt, rf in zip(GRAD_NAMES, got, ref):
        if rf is None:
            assert gt is None, name
            continue
        torch.testing.assert_close(gt, rf, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


# -- the training op's CUDA forward, end to end on CPU tensors ------------------------------------------
def _forward_reference64(x, dw, dw_bias, mid_w, mid_b, mid_bn, mid_act, pw, pw_b, bn_w, bn_b, res, out_act,
                         stride, padding, dilation, eps=1e-5):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    c = F.conv2d(d(x), d(dw), None, stride, padding, dilation, groups=x.shape[1])
    if mid_bn:
        mid_mean, mid_var = c.mean((0, 2, 3)), c.var((0, 2, 3), unbiased=False)
        a = F.batch_norm(c, None, None, d(mid_w), d(mid_b), training=True, eps=eps)
    else:
        mid_mean = mid_var = None
        a = c if dw_bias is None else c + d(dw_bias).reshape(1, -1, 1, 1)
    z = F.conv2d(apply_activation(a, mid_act), d(pw), d(pw_b))
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
    v = F.batch_norm(z, None, None, d(bn_w), d(bn_b), training=True, eps=eps)
    y = apply_activation(v if res is None else v + d(res), out_act)
    return y, z, mean, var, mid_mean, mid_var


@pytest.mark.parametrize("mid_bn,layout,case", [
    (True, "nhwc", Case(n=2, c_in=17, c_out=17, h=9, w=7, stride=2, dilation=2, mid_act="relu", out_act="relu",
                        residual="nhwc")),
    (True, "nchw", Case(n=2, c_in=3, c_out=17, h=7, w=8, dilation=3, mid_act="relu6", out_act="relu6")),
    (False, "nchw", Case(n=2, c_in=17, c_out=3, h=6, w=7, stride=2, dilation=3, mid_act="relu", out_act="none",
                         residual="nchw")),
    (False, "nhwc", Case(n=3, c_in=1, c_out=1, h=5, w=5, out_act="relu")),
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.usefixtures("tf32_off")  # fp32 to fp32's tolerance (TF32's rounding is tested with the inference kernel)
def test_training_forward_end_to_end(mid_bn, layout, case, dtype):
    """triton.training.forward (what joint_block_train runs on CUDA) on CPU tensors, float32 and
    float16 (whose mid BatchNorm affine stays fp32): every output against the float64 composition of
    the same (rounded) inputs."""
    args = make_case_args(case, dtype, layout)
    x, dw, _, dw_bias, mid_act, pw, _, pw_b, res, out_act, stride, padding, dilation = args
    mid_w, mid_b, bn_w, bn_b = _bn_parameters(x.shape[1], pw.shape[0], torch.Generator().manual_seed(3))
    got = triton_training.forward(TrainArgs(x, dw, dw_bias, mid_w, mid_b, mid_bn, 1e-5, mid_act, pw, pw_b, bn_w, bn_b,
                                            1e-5, res, out_act, stride, padding, dilation))
    ref = _forward_reference64(x, dw, dw_bias, mid_w, mid_b, mid_bn, mid_act, pw, pw_b, bn_w, bn_b, res, out_act,
                               stride, padding, dilation)
    fake = training._joint_block_train_fake(x, dw, dw_bias, mid_w, mid_b, mid_bn, 1e-5, mid_act, pw, pw_b, bn_w,
                                            bn_b, 1e-5, res, out_act, stride, padding, dilation)
    names = ("y", "z", "mean", "var", "mid_mean", "mid_var")
    for name, g, r, f in zip(names, got, ref, fake):
        assert g.dtype == f.dtype and g.shape == f.shape and g.stride() == f.stride(), \
            f"{name}: {g.dtype} {tuple(g.shape)} {g.stride()}, fake {f.dtype} {tuple(f.shape)} {f.stride()}"
        if r is None:
            assert g.numel() == 0
            continue
        if dtype == torch.float32:
            torch.testing.assert_close(g.double(), r, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")
        else:  # fp16: the mid activation, z and y are each rounded to fp16 once; 4 units of the largest value
            atol = 4 * U16 * max(1.0, r.abs().max().item())
            torch.testing.assert_close(g.double(), r, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
