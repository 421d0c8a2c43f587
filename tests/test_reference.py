"""The reference path (joint_block_reference, JointBlockReference, fold_batchnorm, activations)
against PyTorch's own modules in float64: nn.Conv2d(groups=C, dilation) -> [nn.BatchNorm2d -> act]
-> nn.Conv2d(1x1) -> nn.BatchNorm2d -> (+ residual) -> act.

Every other test compares against joint_block_reference, so this file is what makes "correct"
mean "what PyTorch computes"."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from helpers import ACT_MODULES, ACTIVATIONS, plain_forward, plain_modules
from lwkernels import JointBlockReference, joint_block_reference
from lwkernels.ops.activation import activation_module, activation_name, apply_activation
from lwkernels.nn.folding import fold_batchnorm, uses_running_stats

# PyTorch's own convolutions (the references, the backward) on one thread: see conftest.single_thread.
pytestmark = pytest.mark.usefixtures("single_thread")

TIGHT = dict(rtol=1e-12, atol=1e-12)

GEOMETRIES = [  # (c_in, c_out, h, w, kernel, stride, padding, dilation)
    (3, 5, 9, 7, 3, 1, None, 1),
    (1, 4, 6, 11, 3, 2, None, 3),
    (17, 3, 5, 5, 5, 1, None, 2),
    (4, 6, 3, 4, 3, (2, 1), (5, 1), (5, 2)),  # H smaller than the dilated kernel, padding makes it legal
    (2, 2, 8, 8, 1, 2, 0, 1),
]


def _folded_reference(mods, x, residual, mid_act, act):
    dw, pw = mods["depthwise"], mods["pointwise"]
    dw_scale, dw_shift = fold_batchnorm(mods["mid_bn"] if "mid_bn" in mods else None, dw.bias)
    pw_scale, pw_shift = fold_batchnorm(mods["bn"], pw.bias)
    return joint_block_reference(x, dw.weight, dw_scale, dw_shift, mid_act, pw.weight, pw_scale, pw_shift,
                                 residual, act, list(dw.stride), list(dw.padding), list(dw.dilation))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("mid_norm,bias,affine", [(False, False, True), (True, True, True), (True, False, False),
                                                  (False, True, False)])
@pytest.mark.parametrize("mid_act,act", list(itertools.product(ACTIVATIONS, repeat=2)))
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
def test_functional_reference_equals_nn_modules(geometry, mid_norm, bias, affine, mid_act, act, with_residual):
    c_in, c_out, h, w, k, stride, padding, dilation = geometry
    mods = plain_modules(c_in, c_out, kernel=k, stride=stride, padding=padding, dilation=dilation,
                         mid_norm=mid_norm, bias=bias, affine=affine, seed=c_in + 10 * c_out).eval()
    gen = torch.Generator().manual_seed(1)
    x = 5.0 * torch.randn(2, c_in, h, w, generator=gen, dtype=torch.float64)
    expected_no_res = plain_forward(mods, x, None, mid_act, "none")
    residual = torch.randn(expected_no_res.shape, generator=gen, dtype=torch.float64) if with_residual else None
    with torch.no_grad():
        expected = plain_forward(mods, x, residual, mid_act, act)
        got = _folded_reference(mods, x, residual, mid_act, act)
    torch.testing.assert_close(got, expected, **TIGHT)


def test_grid_inputs_reach_both_sides_of_relu6():
    """The amplitudes used above make relu6 clip at 0 and at 6 (else relu6 == relu would pass)."""
    mods = plain_modules(3, 5, seed=53).eval()
    x = 5.0 * torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y = plain_forward(mods, x, None, "none", "relu6")
    assert (y == 6).any() and (y == 0).any() and ((y > 0) & (y < 6)).any()


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_functional_reference_without_optional_tensors(layout):
    """No scale/shift/residual: a depthwise conv then a 1x1 conv, exactly nn.Conv2d's."""
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 6, 7, 9, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
    dw = nn.Conv2d(6, 6, 3, stride=2, padding=(3, 1), dilation=(3, 1), groups=6, bias=False, dtype=torch.float64)
    pw = nn.Conv2d(6, 4, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        got = joint_block_reference(x, dw.weight, None, None, "none", pw.weight, None, None, None, "none",
                                    [2, 2], [3, 1], [3, 1])
        torch.testing.assert_close(got, pw(dw(x)), **TIGHT)


@pytest.mark.parametrize("mid_norm", [False, True])
@pytest.mark.parametrize("act,mid_act", [("relu", "none"), ("relu6", "relu6"), ("none", "relu")])
def test_module_reference_equals_plain_composition(mid_norm, act, mid_act):
    """JointBlockReference wires mid_bn -> mid_act -> pointwise -> bn -> + residual -> act in that
    order, in eval and in training mode (identical running-statistics updates)."""
    mods = plain_modules(5, 7, stride=2, dilation=2, mid_norm=mid_norm, bias=True, seed=3)
    ref = JointBlockReference(copy.deepcopy(mods["depthwise"]), copy.deepcopy(mods["pointwise"]),
                              copy.deepcopy(mods["bn"]), ACT_MODULES[act](),
                              copy.deepcopy(mods["mid_bn"]) if mid_norm else None, ACT_MODULES[mid_act]())
    gen = torch.Generator().manual_seed(4)
    x = 3.0 * torch.randn(3, 5, 9, 8, generator=gen, dtype=torch.float64)
    residual = torch.randn(3, 7, 5, 4, generator=gen, dtype=torch.float64)
    for training in (False, True):
        mods.train(training)
        ref.train(training)
        for res in (None, residual):
            torch.testing.assert_close(ref(x, res), plain_forward(mods, x, res, mid_act, act), **TIGHT)
    for name, buf in mods.named_buffers():
        torch.testing.assert_close(dict(ref.named_buffers())[name], buf, **TIGHT)


# -- folding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_batchnorm_matches_eval_batchnorm(affine, with_bias):
    """BN(v + b) == scale * v + shift for an eval BN, with and without affine and conv bias."""
    gen = torch.Generator().manual_seed(5)
    bn = nn.BatchNorm2d(6, eps=1e-3, affine=affine, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(6, generator=gen, dtype=torch.float64) + 0.1)
        if affine:
            bn.weight.copy_(torch.randn(6, generator=gen, dtype=torch.float64))
            bn.bias.copy_(torch.randn(6, generator=gen, dtype=torch.float64))
    bn.eval()
    bias = torch.randn(6, generator=gen, dtype=torch.float64) if with_bias else None
    v = torch.randn(2, 6, 3, 3, generator=gen, dtype=torch.float64)
    scale, shift = fold_batchnorm(bn, bias)
    expected = bn(v if bias is None else v + bias.reshape(1, -1, 1, 1))
    got = v * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    torch.testing.assert_close(got, expected, **TIGHT)


def test_fold_batchnorm_is_differentiable_like_batchnorm():
    """Gradients reach the BN parameters and the conv bias through the folded form as they do
    through nn.BatchNorm2d."""
    gen = torch.Generator().manual_seed(6)
    bn = plain_modules(4, 4, seed=6)["bn"].eval()
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    expected = torch.autograd.grad(bn(v + bias.reshape(1, -1, 1, 1)), (bn.weight, bn.bias, bias), g)
    scale, shift = fold_batchnorm(bn, bias)
    got = torch.autograd.grad(v * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1),
                              (bn.weight, bn.bias, bias), g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TIGHT)


def test_fold_without_batchnorm_passes_the_bias_through():
    bias = torch.randn(3)
    assert fold_batchnorm(None, None) == (None, None)
    scale, shift = fold_batchnorm(None, bias)
    assert scale is None and shift is bias


@pytest.mark.parametrize("make_bn", [
    lambda: nn.BatchNorm2d(3).train(),
    lambda: nn.BatchNorm2d(3, track_running_stats=False).eval(),
], ids=["training", "no_running_stats"])
def test_fold_refuses_batch_statistics(make_bn):
    bn = make_bn()
    assert not uses_running_stats(bn)
    with pytest.raises(ValueError, match="eval mode with running statistics"):
        fold_batchnorm(bn, None)


def test_uses_running_stats():
    assert uses_running_stats(None)
    assert uses_running_stats(nn.BatchNorm2d(3).eval())
    assert not uses_running_stats(nn.BatchNorm2d(3).train())
    assert not uses_running_stats(nn.BatchNorm2d(3, track_running_stats=False).eval())


# -- activations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_apply_activation_equals_pytorch_modules(name):
    t = torch.linspace(-10, 10, 401, dtype=torch.float64)  # includes 0 and 6 exactly
    torch.testing.assert_close(apply_activation(t, name), ACT_MODULES[name]()(t), rtol=0, atol=0)
    assert type(activation_module(name)) is ACT_MODULES[name]


@pytest.mark.parametrize("spec,name", [
    (None, "none"), ("none", "none"), ("ReLU", "relu"), ("relu6", "relu6"),
    (nn.ReLU(), "relu"), (nn.ReLU(inplace=True), "relu"), (nn.ReLU6(), "relu6"), (nn.Identity(), "none"),
])
def test_activation_names(spec, name):
    assert activation_name(spec) == name


@pytest.mark.parametrize("spec", ["gelu", "", nn.GELU(), nn.Hardtanh(0.0, 6.0), nn.LeakyReLU()])
def test_unsupported_activations_are_refused(spec):
    with pytest.raises(ValueError, match="activation"):
        activation_name(spec)


def test_apply_activation_refuses_unknown_names():
    with pytest.raises(ValueError, match="activation must be one of"):
        apply_activation(torch.zeros(1), "gelu")
