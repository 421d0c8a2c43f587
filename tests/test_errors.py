"""Bad input to torch.ops.lwkernels.joint_block raises a clear exception naming the problem, on the
CPU kernel and on the fake ("meta") implementation alike — never a crash, never a wrong result."""
from __future__ import annotations

import textwrap

import pytest
import torch

import lwkernels  # noqa: F401  (registers the op)
import lwkernels.cpu.backend as cpu_backend
from helpers import Case, call_op, make_args, run_python
from lwkernels import JointBlock

CASE = Case(n=2, c_in=4, c_out=6, h=7, w=7, residual="nchw")
NAMES = ["x", "dw_weight", "dw_scale", "dw_shift", "mid_act", "pw_weight", "pw_scale", "pw_shift", "residual",
         "out_act", "stride", "padding", "dilation"]
INDEX = {name: i for i, name in enumerate(NAMES)}
TENSORS = ["x", "dw_weight", "dw_scale", "dw_shift", "pw_weight", "pw_scale", "pw_shift", "residual"]


def args_with(device="cpu", **changes):
    """Valid arguments (on `device`) with some replaced by name; callables get the old value."""
    args = make_args(CASE)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    for name, value in changes.items():
        i = INDEX[name]
        args[i] = value(args[i]) if callable(value) else value
    return args


@pytest.fixture(params=["cpu", "meta"])
def device(request):
    """The CPU kernel and the fake/meta implementation must reject the same inputs."""
    return request.param


def test_valid_arguments_pass(device):
    y = call_op(args_with(device))
    assert tuple(y.shape) == CASE.out_shape and y.device.type == device


# -- shapes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_shape", [(4, 7, 7), (2, 4, 7, 7, 1), (2, 4 * 7 * 7)], ids=lambda s: f"{len(s)}d")
def test_wrong_rank_of_x(device, x_shape):
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor"):
        call_op(args_with(device, x=torch.randn(x_shape, device=device)))


@pytest.mark.parametrize("shape", [(5, 1, 3, 3), (4, 2, 3, 3), (4, 3, 3), (3, 1, 3, 3)])
def test_depthwise_weight_channel_mismatch(device, shape):
    with pytest.raises(ValueError, match=r"dw_weight must have shape \[C_in=4, 1, kh, kw\]"):
        call_op(args_with(device, dw_weight=torch.randn(shape, device=device)))


@pytest.mark.parametrize("shape", [(6, 5, 1, 1), (6, 3, 1, 1), (6, 4, 3, 3), (6, 4)])
def test_pointwise_weight_channel_mismatch(device, shape):
    with pytest.raises(ValueError, match=r"pw_weight must have shape \[C_out, C_in=4, 1, 1\]"):
        call_op(args_with(device, pw_weight=torch.randn(shape, device=device)))


def test_pointwise_weight_without_output_channels(device):
    with pytest.raises(ValueError, match="pw_weight must have at least one output channel"):
        call_op(args_with(device, pw_weight=torch.randn(0, 4, 1, 1, device=device), pw_scale=None, pw_shift=None,
                          residual=None))


@pytest.mark.parametrize("name,length", [("dw_scale", 4), ("dw_shift", 4), ("pw_scale", 6), ("pw_shift", 6)])
@pytest.mark.parametrize("bad", ["length", "rank"])
def test_vector_of_wrong_shape(device, name, length, bad):
    value = torch.randn(length + 1, device=device) if bad == "length" else torch.randn(1, length, device=device)
    with pytest.raises(ValueError, match=rf"{name} must have shape \[{length}\]"):
        call_op(args_with(device, **{name: value}))


@pytest.mark.parametrize("shape", [(2, 6, 7, 8), (2, 5, 7, 7), (1, 6, 7, 7), (2, 6, 7), (6, 7, 7, 2)])
def test_residual_of_wrong_shape(device, shape):
    with pytest.raises(ValueError, match=r"residual must have the output's shape \[2, 6, 7, 7\]"):
        call_op(args_with(device, residual=torch.randn(shape, device=device)))


# -- dtypes and devices ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TENSORS[1:])
def test_dtype_mismatch(device, name):
    with pytest.raises(TypeError, match=rf"{name} has dtype torch.float64 but x has dtype torch.float32"):
        call_op(args_with(device, **{name: lambda t: t.double()}))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_dtype(device, dtype):
    x = torch.ones(2, 4, 7, 7, device=device).to(dtype)
    with pytest.raises(TypeError, match=rf"x must have a floating-point dtype, got {dtype}"):
        call_op(args_with(device, x=x))


@pytest.mark.parametrize("name", TENSORS[1:])
def test_operand_on_another_device(name):
    """A CPU x with one operand on a second device ("meta"), and the other way round."""
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on cpu"):
        call_op(args_with("cpu", **{name: lambda t: t.to("meta")}))
    meta_but_one = args_with("meta", **{name: make_args(CASE)[INDEX[name]]})
    with pytest.raises(ValueError, match=rf"{name} is on cpu but x is on meta"):
        call_op(meta_but_one)


# -- convolution parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,value,message", [
    ("stride", [0, 1], r"stride must be positive, got \(0, 1\)"),
    ("stride", [1, -2], r"stride must be positive"),
    ("dilation", [1, 0], r"dilation must be positive, got \(1, 0\)"),
    ("dilation", [-1, -1], r"dilation must be positive"),
    ("padding", [-1, 0], r"padding must be non-negative, got \(-1, 0\)"),
    ("padding", [1, -3], r"padding must be non-negative"),
    ("stride", [1], r"stride must be two ints \(h, w\)"),
    ("padding", [1, 1, 1], r"padding must be two ints \(h, w\)"),
    ("dilation", [], r"dilation must be two ints \(h, w\)"),
])
def test_bad_convolution_parameters(device, name, value, message):
    with pytest.raises(ValueError, match=message):
        call_op(args_with(device, residual=None, **{name: value}))


@pytest.mark.parametrize("h,w,k,padding,dilation", [
    (2, 7, 3, [0, 0], [1, 1]),   # 3x3 kernel, 2-pixel-high input, no padding
    (7, 4, 3, [1, 0], [3, 3]),   # dilated kernel 7 wide, 4 wide input
    (1, 1, 5, [1, 1], [1, 1]),   # padded input 3x3, kernel 5x5
])
def test_kernel_larger_than_padded_input(device, h, w, k, padding, dilation):
    x = torch.randn(2, 4, h, w, device=device)
    with pytest.raises(ValueError, match=r"the dilated kernel \(\d+x\d+\) is larger than the padded input"):
        call_op(args_with(device, x=x, dw_weight=torch.randn(4, 1, k, k, device=device), residual=None,
                          padding=padding, dilation=dilation))


@pytest.mark.parametrize("name", ["mid_act", "out_act"])
@pytest.mark.parametrize("value", ["gelu", "RELU", "", "relu "])
def test_bad_activation_name(device, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be one of \('none', 'relu', 'relu6', 'hardswish', 'silu'\), got {value!r}"):
        call_op(args_with(device, **{name: value}))


# -- the CPU path selection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["sse9", "avx512bw", "gpu", "1"])
def test_bad_cpu_isa_value(monkeypatch, value):
    monkeypatch.setenv(cpu_backend.ISA_ENV, value)
    with pytest.raises(ValueError, match=rf"LWKERNELS_CPU_ISA='{value}' is not a CPU path"):
        call_op(args_with())


def _unsupported_paths():
    try:
        from lwkernels import _C
    except ImportError:
        return ["neon"]  # the tests then fail on the missing extension, as they should
    return [p for p in cpu_backend.CPU_PATHS if not _C.isa_supported(p)]


@pytest.mark.parametrize("path", _unsupported_paths() or [pytest.param("none", marks=pytest.mark.skip(
    reason="every CPU path is supported here"))])
def test_unsupported_cpu_isa(monkeypatch, path):
    """E.g. "neon" on x86-64: refused with a message, not an illegal instruction."""
    monkeypatch.setenv(cpu_backend.ISA_ENV, path)
    with pytest.raises(RuntimeError, match=rf"LWKERNELS_CPU_ISA='{path}': this build or this CPU does not support"):
        call_op(args_with())


# -- through autograd, and the C++ layer's own checks ----------------------------------------------------------
def test_errors_with_requires_grad_inputs():
    """The autograd wrapper does not turn argument errors into something else."""
    def grad(t):
        return t.detach().requires_grad_()
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        call_op(args_with(x=grad, dw_weight=grad, pw_weight=grad, residual=torch.randn(2, 6, 7, 6)))
    with pytest.raises(TypeError, match="pw_weight has dtype torch.float64"):
        call_op(args_with(x=grad, pw_weight=lambda t: t.double().requires_grad_()))


def test_native_layer_rejects_bad_geometry_without_crashing(tmp_path):
    """lwkernels._C validates what it is given (its last line of defence against out-of-bounds
    access): run in a subprocess so that a crash is reported as a failure, not lost."""
    code = textwrap.dedent("""
        import lwkernels.cpu.backend as cb
        _C = cb.native()
        ok = dict(batch=1, in_channels=4, in_h=7, in_w=7, out_channels=6, out_h=7, out_w=7, kernel_h=3,
                  kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1, layout="nchw")
        assert _C.JointGeometry(**ok).validate() == "", _C.JointGeometry(**ok).validate()
        bad = [dict(out_h=8), dict(out_w=3), dict(stride_h=0), dict(dil_w=0), dict(pad_h=-1),
               dict(kernel_w=9, pad_w=0)]
        for change in bad:
            message = _C.JointGeometry(**dict(ok, **change)).validate()
            assert message, f"validate() accepted {change}"
        import torch
        w = torch.randn(6, 4)
        packed = _C.pack_pointwise_f32("scalar", "nchw", w.data_ptr(), 6, 4)
        x, y = torch.randn(1, 4, 7, 7), torch.empty(1, 6, 7, 7)
        dw = torch.randn(4, 1, 3, 3)
        for change in bad + [dict(layout="nhwc"), dict(in_channels=5), dict(out_channels=5)]:
            g = _C.JointGeometry(**dict(ok, **change))
            try:
                _C.joint_forward(packed, g, x.data_ptr(), dw.data_ptr(), 0, 0, "none", 0, 0, 0, "none",
                                 y.data_ptr(), 1)
            except ValueError:
                continue
            raise AssertionError(f"joint_forward accepted {change}")
        for name in ("gelu", "relu "):
            try:
                _C.joint_forward(packed, _C.JointGeometry(**ok), x.data_ptr(), dw.data_ptr(), 0, 0, name, 0, 0, 0,
                                 "none", y.data_ptr(), 1)
            except ValueError:
                continue
            raise AssertionError(f"joint_forward accepted activation {name!r}")
        print("OK")
    """)
    proc = run_python(["-c", code], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), \
        f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


# -- what a JointBlock user reads first ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_block_errors_name_what_the_user_passed(mode):
    """The messages a user of JointBlock meets first speak of x and the block, not of op arguments."""
    block = JointBlock(32, 64, dilation=3)
    block.train(mode == "train")
    cases = [
        (torch.randn(2, 16, 8, 8), ValueError, r"x has 16 channels \(shape \[2, 16, 8, 8\]\) but the block expects 32"),
        (torch.randn(32, 8, 8), ValueError, r"got 3-D shape \[32, 8, 8\] \(one image needs a batch dimension"),
        (torch.ones(2, 32, 8, 8, dtype=torch.long), TypeError, r"got torch.int64 \(convert it with x.float\(\)\)"),
        (torch.randn(2, 32, 8, 8, dtype=torch.float64), TypeError,
         r"but x has dtype torch.float64.*convert x with x.to\(torch.float32\) or the module with .to\(torch.float64\)"),
    ]
    for x, error, message in cases:
        with torch.no_grad(), pytest.raises(error, match=message):
            block(x)


def test_too_small_input_names_its_shape():
    block = JointBlock(4, 4, dilation=3, padding=0).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"x of shape \[1, 4, 5, 5\] is too small for a 3x3 kernel "
                                                          r"with dilation \(3, 3\) and padding \(0, 0\)"):
        block(torch.randn(1, 4, 5, 5))
