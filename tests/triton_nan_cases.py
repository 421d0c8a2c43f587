"""Non-finite parity of the Triton kernels, run by Triton's interpreter on CPU tensors (a sample of
test_nan_parity.py's grid): the fused inference kernel, the training forward (depthwise statistics,
the fused kernel with its statistics epilogue, then normalisation) and the depthwise backward, each
against float64 PyTorch. Non-finite positions must be identical.

Not collected by a plain `pytest` run: TRITON_INTERPRET must be set before Triton is first imported,
so test_nan_parity.py runs this module in a fresh pytest process with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported (test_nan_parity.py does that)",
                allow_module_level=True)
pytest.importorskip("triton")

import torch  # noqa: E402

from helpers import Case, reference64  # noqa: E402
from lwkernels.ops import training_reference  # noqa: E402
from lwkernels.ops.args import TrainArgs  # noqa: E402
from lwkernels.triton import training as triton_training  # noqa: E402
from lwkernels.triton.dw_backward import depthwise_backward_triton  # noqa: E402
from lwkernels.triton.joint_block import joint_block_triton  # noqa: E402
from triton_helpers import make_case_args  # noqa: E402

#: (argument index in the op's signature, what to poison, value); 0 = x, 1 = dw_weight, 3 = dw_shift,
#: 5 = pw_weight, 6 = pw_scale.
INFERENCE_POISONS = ((0, math.nan), (0, math.inf), (0, -math.inf), (1, math.nan), (3, math.nan), (5, math.nan),
                     (6, math.nan))


def _same_nonfinite(actual, expected, what):
    a, e = actual.double(), expected.double()
    for name, mask in (("NaN", torch.isnan), ("+Inf", lambda t: t == math.inf), ("-Inf", lambda t: t == -math.inf)):
        assert torch.equal(mask(a), mask(e)), f"{what}: {name} positions differ ({int((mask(a) != mask(e)).sum())})"
    assert not torch.isfinite(e).all(), f"{what}: the poison did not reach the reference"


def _poison_(t: torch.Tensor, value: float) -> None:
    flat = t.view(-1) if t.is_contiguous() else t.permute(0, 2, 3, 1).reshape(-1)
    if t.dim() == 4 and t.shape[2] > 2:
        t[0, min(1, t.shape[1] - 1), t.shape[2] // 2, t.shape[3] // 2] = value
    else:
        flat[min(1, flat.numel() - 1)] = value


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("acts", [("relu", "relu6"), ("relu6", "relu"), ("none", "none"), ("hardswish", "silu"),
                                  ("silu", "hardswish")], ids=str)
@pytest.mark.parametrize("poison", INFERENCE_POISONS, ids=str)
def test_inference_kernel(poison, acts, layout):
    index, value = poison
    mid_act, out_act = acts
    case = Case(n=1, c_in=3, c_out=5, h=6, w=7, dilation=2, mid_act=mid_act, out_act=out_act, residual="nchw")
    args = make_case_args(case, torch.float32, layout)
    with torch.no_grad():
        _poison_(args[index], value)
    expected = reference64(args)
    if "relu6" in acts and math.isinf(value):
        assert torch.isfinite(expected).all()  # relu6 clamps +-Inf: the positions must still agree
        torch.testing.assert_close(joint_block_triton(*args).double(), expected, rtol=1e-4, atol=1e-4)
        return
    _same_nonfinite(joint_block_triton(*args), expected, f"poison {poison} acts {acts} {layout}")


@pytest.mark.parametrize("mid_bn", [False, True])
@pytest.mark.parametrize("poison", ["x", "dw_bias", "pw_weight"])
def test_training_forward(poison, mid_bn):
    """training's CUDA forward (Triton statistics kernels + PyTorch normalisation) on CPU tensors,
    against its PyTorch-ops forward in float64: y, z, the statistics."""
    gen = torch.Generator().manual_seed(3)
    c_in, c_out = 3, 5
    x = torch.randn(2, c_in, 6, 7, generator=gen)
    dw_weight = torch.randn(c_in, 1, 3, 3, generator=gen)
    dw_bias = torch.randn(c_in, generator=gen)
    mid_w, mid_b = 1 + 0.2 * torch.randn(c_in, generator=gen), 0.2 * torch.randn(c_in, generator=gen)
    pw_weight = torch.randn(c_out, c_in, 1, 1, generator=gen)
    pw_bias = torch.randn(c_out, generator=gen)
    bn_w, bn_b = 1 + 0.2 * torch.randn(c_out, generator=gen), 0.2 * torch.randn(c_out, generator=gen)
    target = {"x": x, "dw_bias": dw_bias, "pw_weight": pw_weight}[poison]
    target.view(-1)[min(7, target.numel() - 1)] = math.nan
    args = [x, dw_weight, dw_bias, mid_w, mid_b, mid_bn, 1e-5, "relu", pw_weight, pw_bias, bn_w, bn_b, 1e-5, None,
            "relu6", [1, 1], [2, 2], [2, 2]]
    got = triton_training.forward(TrainArgs(*args))
    expected = training_reference.forward(TrainArgs(*[a.double() if isinstance(a, torch.Tensor) else a for a in args]))
    for name, g, e in zip(("y", "z", "mean", "var", "mid_mean", "mid_var"), got, expected):
        if e.numel():
            a, b = g.double(), e
            for label, mask in (("NaN", torch.isnan), ("Inf", torch.isinf)):
                assert torch.equal(mask(a), mask(b)), f"{poison} mid_bn={mid_bn} {name}: {label} positions differ"
    assert not torch.isfinite(expected[0]).all()


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_depthwise_backward(layout):
    """grad x and grad dw_weight with a NaN in the incoming gradient and one in x."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 7, 6, generator=gen)
    w = torch.randn(4, 1, 3, 3, generator=gen)
    g = torch.randn(2, 4, 7, 6, generator=gen)
    g[1, 2, 3, 3] = math.nan
    x[0, 1, 2, 2] = math.inf
    if layout == "nhwc":
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    gx, gw = depthwise_backward_triton(g, x, w, [1, 1], [2, 2], [2, 2])
    ex, ew, _ = torch.ops.aten.convolution_backward(g.double(), x.double(), w.double(), None, [1, 1], [2, 2], [2, 2],
                                                    False, [0, 0], 4, [True, True, False])
    _same_nonfinite(gx, ex, f"grad x {layout}")
    _same_nonfinite(gw, ew, f"grad dw_weight {layout}")
