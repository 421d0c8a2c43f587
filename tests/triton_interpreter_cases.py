"""The Triton kernel's logic on the CPU: lwkernels.triton.joint_block.joint_block_triton run by Triton's
interpreter on CPU tensors, against joint_block_reference, in float32 and float16.

Not collected by a plain `pytest` run (the name does not start with test_): TRITON_INTERPRET must
be set before Triton is first imported, so test_triton_interpreter.py runs this module in a fresh
pytest process with TRITON_INTERPRET=1. To run it by hand:

    TRITON_INTERPRET=1 pytest tests/triton_interpreter_cases.py

The interpreter computes tl.dot in plain fp32 and cannot do bf16 arithmetic; the kernel's own
rounding of TF32 dot operands runs here too. bf16, the tensor cores' TF32 arithmetic and the
GPU compiler's constraints (dot tiles >= 16 in every dimension, which the kernel's tiles respect by
construction) are covered by test_triton_gpu.py on a GPU.
"""
from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported (test_triton_interpreter.py does that)",
                allow_module_level=True)
pytest.importorskip("triton")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import Case  # noqa: E402
from lwkernels.triton import joint_block as triton_kernel  # noqa: E402
from lwkernels.ops.reference import joint_block_reference  # noqa: E402
from lwkernels.triton.joint_block import PINNED_CONFIG, joint_block_triton  # noqa: E402
from triton_helpers import (INTERPRETER_CASES, INTERPRETER_VIEW_CASES, assert_matches_lowp_rule,  # noqa: E402
                            make_case_args, poison_kernel_outputs, transposed_pointwise)


@pytest.fixture
def nan_outputs(monkeypatch):
    """The launcher's outputs start as NaN: an unwritten element fails the comparison."""
    poison_kernel_outputs(monkeypatch)


pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("nan_outputs")]

DTYPES = [torch.float32, torch.float16]
DENSE_LAYOUTS = ["nchw", "nhwc"]


def test_running_in_the_interpreter():
    assert triton_kernel.INTERPRET
    assert type(triton_kernel._joint_block_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=str)
def test_matches_reference(case, dtype, layout):
    args = make_case_args(case, dtype, layout)
    y = joint_block_triton(*args)
    assert_matches_lowp_rule(y, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", INTERPRETER_VIEW_CASES, ids=str)
def test_non_contiguous_operands(case, dtype):
    args = make_case_args(case, dtype, case.layout)
    assert not args[0].is_contiguous() and not args[0].is_contiguous(memory_format=torch.channels_last)
    args = transposed_pointwise(args)
    y = joint_block_triton(*args)
    assert_matches_lowp_rule(y, args)


@pytest.mark.parametrize("config", [
    {"BLOCK_P": 32, "BLOCK_CO": 16, "BLOCK_CI": 32},
    {"BLOCK_P": 16, "BLOCK_CO": 64, "BLOCK_CI": 16},
    {"BLOCK_P": 64, "BLOCK_CO": 32, "BLOCK_CI": 16},
], ids=lambda c: f"p{c['BLOCK_P']}co{c['BLOCK_CO']}ci{c['BLOCK_CI']}")
@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
def test_other_tilings(config, layout):
    """Tiles other than the pinned one: partial last tiles in every dimension."""
    case = Case(n=2, c_in=37, c_out=35, h=9, w=7, stride=2, dilation=2, mid_act="relu", out_act="relu6",
                residual="nhwc")
    args = make_case_args(case, torch.float32, layout)
    assert_matches_lowp_rule(joint_block_triton(*args, config=config), args)


def test_tf32_rounds_the_dot_operands():
    """allow_tf32: the fp32 dot's operands are rounded to TF32 (the error visibly grows, within the TF32
    rule); without it the dot is full fp32."""
    args = make_case_args(INTERPRETER_CASES[0], torch.float32, "nhwc")
    exact = assert_matches_lowp_rule(joint_block_triton(*args, allow_tf32=False), args)
    tf32 = assert_matches_lowp_rule(joint_block_triton(*args, allow_tf32=True), args, tf32=True)
    assert tf32.kernel_error > 20 * exact.kernel_error, (exact, tf32)


@triton.jit
def _dot_operand_kernel(x_ptr, y_ptr, N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, triton_kernel._dot_operand(tl.load(x_ptr + offs), DOT_PRECISION))


def _round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest TF32 (10 mantissa bits, fp32's exponent range), ties away from zero, in float64."""
    m, e = torch.frexp(x.double().abs())  # |x| = m * 2^e, m in [0.5, 1)
    unit = torch.exp2((torch.clamp(e - 1, min=-126) - 10).double())  # TF32's spacing at |x| (subnormals: fixed)
    r = torch.floor(x.double().abs() / unit + 0.5) * unit
    r = torch.where(r >= 2.0 ** 128, torch.inf, r)
    return torch.where(torch.isfinite(x), torch.copysign(r, x.double()), x.double()).float()


def test_tf32_operand_rounding_is_round_to_nearest():
    """_dot_operand: every fp32 value to its nearest TF32 value (ties away from zero, like cvt.rna),
    overflow to infinity, signed zeros, infinities and NaN kept; fp32 untouched for an "ieee" dot."""
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"),
                            1 + 2 ** -11, -(1 + 2 ** -11), 1 + 2 ** -11 - 2 ** -23, 1 + 3 * 2 ** -11,
                            3.4028235e38, -3.4028235e38, 2 ** -149, 2 ** -126 * (1 + 2 ** -11), 1.1754942e-38])
    nan_payloads = torch.tensor([0x7F800001, 0x7FFFFFFF, -1, 0x7FFFF000], dtype=torch.int32).view(torch.float32)
    spread = 256 - special.numel() - nan_payloads.numel()  # random values from subnormal to huge
    x = torch.cat([special, nan_payloads, torch.randn(spread, generator=gen) * torch.exp2(
        torch.randint(-140, 120, (spread,), generator=gen).float())])
    y = torch.empty_like(x)
    _dot_operand_kernel[(1,)](x, y, N=256, DOT_PRECISION="tf32")
    ref = _round_to_tf32(x)
    assert torch.equal(torch.isnan(y), torch.isnan(x))
    finite = ~torch.isnan(x)
    wrong = (y[finite].view(torch.int32) != ref[finite].view(torch.int32)).nonzero().flatten()
    assert not wrong.numel(), [(x[finite][i].item(), y[finite][i].item(), ref[finite][i].item()) for i in wrong[:5]]
    assert y[6].item() == 1 + 2 ** -10 and y[7].item() == -(1 + 2 ** -10) and y[8].item() == 1.0
    assert y[10].item() == float("inf") and y[11].item() == float("-inf")
    _dot_operand_kernel[(1,)](x, y, N=256, DOT_PRECISION="ieee")
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))


def test_nan_propagates_like_pytorch():
    """relu/relu6 keep NaN (as torch.relu/clamp do) instead of turning it into 0."""
    case = Case(n=1, c_in=3, c_out=4, h=5, w=5, mid_act="relu", out_act="relu6")
    args = make_case_args(case, torch.float32, "nchw")
    args[0][0, 1, 2, 2] = float("nan")
    y = joint_block_triton(*args)
    ref = joint_block_reference(*args)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.isnan(y).any()


def test_empty_batch_launches_nothing():
    case = Case(n=0, c_in=3, c_out=5, h=7, w=7)
    args = make_case_args(case, torch.float32, "nhwc")
    y = joint_block_triton(*args)
    assert y.shape == (0, 5, 7, 7)


def test_rejects_bad_arguments_like_the_op():
    args = make_case_args(INTERPRETER_CASES[0], torch.float32, "nchw")
    bad = list(args)
    bad[5] = args[5][:, :-1]
    with pytest.raises(ValueError, match="pw_weight"):
        joint_block_triton(*bad)
    with pytest.raises(TypeError, match="computes in"):
        joint_block_triton(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    with pytest.raises(ValueError, match="power of two"):
        joint_block_triton(*args, config={"BLOCK_P": 8, "BLOCK_CO": 16, "BLOCK_CI": 16})


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 2), c_in=st.integers(1, 20), c_out=st.integers(1, 20),
    h=st.integers(1, 9), w=st.integers(1, 9), k=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2), dilation=st.integers(1, 3), extra_pad=st.integers(0, 1),
    mid_act=st.sampled_from(["none", "relu", "relu6", "hardswish", "silu"]),
    out_act=st.sampled_from(["none", "relu", "relu6", "hardswish", "silu"]),
    residual=st.sampled_from([None, "nchw", "nhwc"]), layout=st.sampled_from(DENSE_LAYOUTS),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 16),
)
def test_random_shapes(n, c_in, c_out, h, w, k, stride, dilation, extra_pad, mid_act, out_act, residual, layout,
                       dtype, seed):
    pad = dilation * (k - 1) // 2 + extra_pad
    span = dilation * (k - 1) + 1
    h, w = max(h, span - 2 * pad), max(w, span - 2 * pad)  # keep the output non-empty
    case = Case(n=n, c_in=c_in, c_out=c_out, h=h, w=w, kernel=k, stride=stride, padding=pad, dilation=dilation,
                mid_act=mid_act, out_act=out_act, residual=residual)
    args = make_case_args(case, dtype, layout, seed=seed)
    assert_matches_lowp_rule(joint_block_triton(*args), args)


def test_pinned_config_respects_gpu_dot_minimum():
    assert min(PINNED_CONFIG[k] for k in ("BLOCK_P", "BLOCK_CO", "BLOCK_CI")) >= 16
