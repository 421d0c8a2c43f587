"""Random property tests (hypothesis): for random small shapes, convolution parameters, options,
layouts, dtypes and CPU paths, the fused op equals the float64 reference — what the grids miss."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (cpu_paths_here, ACTIVATIONS, X_LAYOUTS, Case, assert_matches_reference, call_op, conv_out, forced_isa, make_args,
                     torch_threads)

# A few ms an example: about 10 s for the file on an idle 2-core machine. The NaN-poisoning fixture
# is shared by all examples of a test, which is what we want here.
PROPERTY_SETTINGS = settings(max_examples=1500, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def cases(draw, dtypes=(torch.float32, torch.float64)):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    if draw(st.booleans()):
        padding = None  # the op's default: dilation * (k - 1) // 2
        ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    else:
        ph, pw = draw(st.integers(0, 6)), draw(st.integers(0, 6))
        padding = (ph, pw)
    # From the smallest input that the (dilated) kernel fits into once padded, up to 9 more.
    h_min, w_min = max(1, dh * (kh - 1) + 1 - 2 * ph), max(1, dw * (kw - 1) + 1 - 2 * pw)
    h, w = draw(st.integers(h_min, h_min + 9)), draw(st.integers(w_min, w_min + 9))
    layout = draw(st.sampled_from(X_LAYOUTS))
    case = Case(
        n=draw(st.integers(0 if layout != "expanded" else 1, 3)),
        c_in=draw(st.integers(1, 24)), c_out=draw(st.integers(1, 40)), h=h, w=w,
        kernel=(kh, kw), stride=(sh, sw), padding=padding, dilation=(dh, dw),
        mid_act=draw(st.sampled_from(ACTIVATIONS)), out_act=draw(st.sampled_from(ACTIVATIONS)),
        dw_scale=draw(st.booleans()), dw_shift=draw(st.booleans()),
        pw_scale=draw(st.booleans()), pw_shift=draw(st.booleans()),
        residual=draw(st.sampled_from([None, "nchw", "nhwc"])), layout=layout,
        dtype=draw(st.sampled_from(dtypes)),
    )
    assert min(case.out_shape) >= 0 and case.out_shape[2] >= 1 and case.out_shape[3] >= 1
    return case


@pytest.mark.usefixtures("nan_outputs")
@PROPERTY_SETTINGS
@given(case=cases(), isa=st.sampled_from(cpu_paths_here()), threads=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_fused_op_equals_reference(case, isa, threads, seed):
    args = make_args(case, seed)
    with forced_isa(isa), torch_threads(threads):
        y = call_op(args)
    assert_matches_reference(y, args, accumulation_length=case.accumulation_length)


@pytest.mark.usefixtures("nan_outputs")
@settings(PROPERTY_SETTINGS, max_examples=300)
@given(case=cases(dtypes=(torch.float16, torch.bfloat16)), seed=st.integers(0, 2 ** 16))
def test_low_precision_equals_reference(case, seed):
    args = make_args(case, seed)
    assert_matches_reference(call_op(args), args, accumulation_length=case.accumulation_length)


@settings(PROPERTY_SETTINGS, max_examples=300)
@given(case=cases(), seed=st.integers(0, 2 ** 16))
def test_fake_implementation_agrees_with_the_kernel(case, seed):
    """The meta/fake implementation predicts the CPU output's shape, dtype and strides."""
    args = make_args(case, seed)
    y = call_op(args)
    meta = call_op([torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
                    if isinstance(a, torch.Tensor) else a for a in args])
    assert meta.shape == y.shape and meta.dtype == y.dtype
    if y.numel():
        assert meta.stride() == y.stride()


def test_strategy_reaches_the_edges():
    """The case strategy can produce the awkward cases of docs/testing.md, The awkward-shape grid (a
    guard against it silently narrowing): a kernel larger than the unpadded input, batch 0, a 1x1
    output."""
    assert conv_out(1, 5, 1, 2, 1) == 1  # 5-tap kernel on a 1-pixel input with default padding
    found = {"kernel>input": False, "batch0": False, "1x1out": False}

    @settings(max_examples=300, deadline=None, database=None)
    @given(case=cases())
    def scan(case):
        (kh, _), (dh, _) = case.kernel_hw, case.dilation_hw
        found["kernel>input"] |= dh * (kh - 1) + 1 > case.h
        found["batch0"] |= case.n == 0
        found["1x1out"] |= case.out_shape[2:] == (1, 1)

    scan()
    assert all(found.values()), found
