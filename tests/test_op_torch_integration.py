"""The op as a citizen of PyTorch: torch.library.opcheck (schema, fake/meta, autograd
registration, AOT dispatch), torch.compile(fullgraph=True), gradcheck of every differentiable
input in float64, and JointBlock gradients against JointBlockReference."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

import lwkernels
from helpers import ACTIVATIONS, Case, as_float64, call_op, make_args, randomize_, reference64
from lwkernels.ops.activation import apply_activation

# PyTorch's own convolutions (the references, the backward) on one thread: see conftest.single_thread.
pytestmark = pytest.mark.usefixtures("single_thread")

OP = torch.ops.lwkernels.joint_block.default
DIFFERENTIABLE = {"x": 0, "dw_weight": 1, "dw_scale": 2, "dw_shift": 3, "pw_weight": 5, "pw_scale": 6,
                  "pw_shift": 7, "residual": 8}


def with_grad(args, dtype=None):
    """Copies of the tensor arguments that require grad (layouts/strides preserved)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.detach().clone() if dtype is None else a.detach().to(dtype)
            a.requires_grad_()
        out.append(a)
    return out


# -- opcheck ------------------------------------------------------------------------------------------
OPCHECK_CASES = {  # name: (case, inputs require grad: exercises the autograd registration)
    "all_options_nchw_grad": (Case(n=2, c_in=3, c_out=5, h=7, w=6, stride=(2, 1), dilation=(2, 3), mid_act="relu",
                                   out_act="relu6", residual="nchw"), True),
    "no_options_nhwc": (Case(n=1, c_in=4, c_out=3, h=5, w=5, dw_scale=False, dw_shift=False, pw_scale=False,
                             pw_shift=False, out_act="none", layout="nhwc"), False),
    "residual_other_layout_grad": (Case(n=2, c_in=5, c_out=4, h=6, w=7, kernel=5, padding=(1, 3), mid_act="relu6",
                                        residual="nchw", layout="nhwc"), True),
    "noncontiguous_float64_grad": (Case(n=2, c_in=3, c_out=2, h=5, w=4, layout="sliced", dtype=torch.float64,
                                        residual="nhwc"), True),
    "empty_batch": (Case(n=0, c_in=3, c_out=4, h=5, w=5, layout="nhwc"), False),
    "half": (Case(n=1, c_in=3, c_out=4, h=5, w=5, layout="nhwc", dtype=torch.float16, residual="nhwc"), False),
}


@pytest.mark.parametrize("name", OPCHECK_CASES)
def test_opcheck(name):
    case, requires_grad = OPCHECK_CASES[name]
    args = make_args(case, seed=1)
    if requires_grad:
        args = with_grad(args)
    torch.library.opcheck(OP, tuple(args))


# -- torch.compile ---------------------------------------------------------------------------------------
def test_compile_fullgraph_op():
    """The op inside a compiled function (with ops around it) equals eager, without graph breaks."""
    case = Case(n=2, c_in=6, c_out=10, h=9, w=9, dilation=3, mid_act="relu", out_act="relu6", residual="nhwc",
                layout="nhwc")
    args = make_args(case, seed=2)

    def fn(x, residual):
        y = torch.ops.lwkernels.joint_block(x * 0.5, *args[1:8], residual, *args[9:])
        return y + 1.0

    compiled = torch.compile(fn, fullgraph=True)
    expected = fn(args[0], args[8])
    got = compiled(args[0], args[8])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert got.is_contiguous(memory_format=torch.channels_last)
    args2 = make_args(case, seed=3)  # new input values, same shapes: no recompilation needed, new result
    torch.testing.assert_close(compiled(args2[0], args2[8]), fn(args2[0], args2[8]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_compile_fullgraph_block_eval(layout):
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    block = randomize_(lwkernels.JointBlock(6, 12, stride=2, dilation=2, mid_norm=True, activation="relu6",
                                            bias=True), seed=4).eval()
    x = torch.randn(2, 6, 11, 10, generator=torch.Generator().manual_seed(5)).contiguous(memory_format=fmt)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        expected = block(x)
        got = compiled(x)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        assert got.is_contiguous(memory_format=fmt)
        # New weights loaded in place: the compiled block computes with them too.
        block.load_state_dict(randomize_(copy.deepcopy(block), seed=5).state_dict())
        expected_new = block(x)
        assert not torch.allclose(expected_new, expected)
        torch.testing.assert_close(compiled(x), expected_new, rtol=1e-6, atol=1e-6)


def test_export_block_eval():
    """torch.export sees the op through its fake implementation; the exported program runs it."""
    block = randomize_(lwkernels.JointBlock(4, 8, dilation=3, bias=True), seed=6).eval()
    x = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(7))
    res = torch.randn(2, 8, 9, 7, generator=torch.Generator().manual_seed(8))
    exported = torch.export.export(block, (x, res))
    assert any(node.target is OP for node in exported.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x, res), block(x, res), rtol=1e-6, atol=1e-6)


# -- gradcheck ---------------------------------------------------------------------------------------------
KINKS = {"none": (), "relu": (0.0,), "relu6": (0.0, 6.0), "hardswish": (-3.0, 3.0), "silu": ()}
MARGIN = 1e-3  # pre-activations stay this far from a kink, so finite differences never straddle one


def _pre_activations(args):
    """(mid pre-activation, output pre-activation) of the reference, in float64."""
    x, dw, dws, dwb, mid_act, pw, pws, pwb, res, out_act, s, p, d = as_float64(args)
    t = torch.nn.functional.conv2d(x, dw, None, s, p, d, groups=x.shape[1])
    t = t * (1 if dws is None else dws.reshape(1, -1, 1, 1)) + (0 if dwb is None else dwb.reshape(1, -1, 1, 1))
    y = torch.nn.functional.conv2d(apply_activation(t, mid_act), pw)
    y = y * (1 if pws is None else pws.reshape(1, -1, 1, 1)) + (0 if pwb is None else pwb.reshape(1, -1, 1, 1))
    return t, y + (0 if res is None else res)


def kink_free_args(case: Case):
    """make_args for the first seed whose pre-activations avoid every kink of both activations
    by MARGIN, and (for relu6) reach both clipped regions, so every branch is exercised."""
    for seed in range(200):
        args = make_args(case, seed)
        mid, out = _pre_activations(args)
        ok = True
        for pre, act in ((mid, case.mid_act), (out, case.out_act)):
            for kink in KINKS[act]:
                ok &= bool((pre - kink).abs().min() > MARGIN)
            if act == "relu6":
                ok &= bool((pre < 0).any() and (pre > 6).any())
        if ok:
            return args
    raise AssertionError("no kink-free seed found; enlarge the search")


GRAD_CASES = [
    Case(n=2, c_in=2, c_out=3, h=4, w=5, stride=(2, 1), padding=(2, 1), dilation=(2, 1), mid_act=m, out_act=o,
         residual="nchw", dtype=torch.float64)
    for m, o in itertools.product(ACTIVATIONS, repeat=2)
] + [
    Case(n=1, c_in=4, c_out=3, h=6, w=5, dilation=2, mid_act="relu", out_act="relu6", residual="nchw",
         layout="nhwc", dtype=torch.float64),
    Case(n=2, c_in=2, c_out=3, h=5, w=5, kernel=(3, 1), stride=2, mid_act="relu6", out_act="relu",
         dw_scale=False, pw_shift=False, residual="nhwc", layout="sliced", dtype=torch.float64),
    Case(n=1, c_in=3, c_out=2, h=4, w=4, dw_scale=False, dw_shift=False, pw_scale=False, pw_shift=False,
         out_act="none", dtype=torch.float64),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_gradcheck(case):
    """gradcheck of every differentiable input. Its numerical Jacobian perturbs inputs in place
    through `.data` (no version-counter bump), so this also requires that a perturbed pointwise
    weight is not served from a stale packed copy."""
    args = with_grad(kink_free_args(case))
    present = [i for i in DIFFERENTIABLE.values() if isinstance(args[i], torch.Tensor)]

    def fn(*tensors):
        full = list(args)
        for i, t in zip(present, tensors):
            full[i] = t
        return call_op(full)

    assert torch.autograd.gradcheck(fn, [args[i] for i in present], eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_block_parameters():
    """gradcheck with a JointBlock's own parameters as inputs (eval mode: the fused op). gradcheck
    perturbs the nn.Parameters themselves through `.data`; the block must see every perturbation.
    No activations, so there are no kinks."""
    block = randomize_(lwkernels.JointBlock(3, 4, stride=2, dilation=2, mid_norm=True, activation=None,
                                            mid_activation=None, bias=True), seed=10).double().eval()
    x = torch.randn(1, 3, 5, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64,
                    requires_grad=True)
    params = list(block.parameters())
    assert any(p is block.pointwise.weight for p in params)
    assert torch.autograd.gradcheck(lambda x, *ps: block(x), [x] + params, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case", [GRAD_CASES[5], GRAD_CASES[9]], ids=str)
def test_gradients_equal_reference_autograd(case):
    """The registered backward equals autograd through joint_block_reference (in float64), for
    every input that has a gradient."""
    base = kink_free_args(case)
    args, ref_args = with_grad(base), with_grad(base)
    g = torch.randn(reference64(base).shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    names = [n for n, i in DIFFERENTIABLE.items() if isinstance(args[i], torch.Tensor)]
    got = torch.autograd.grad(call_op(args), [args[DIFFERENTIABLE[n]] for n in names], g)
    expected = torch.autograd.grad(lwkernels.joint_block_reference(*ref_args),
                                   [ref_args[DIFFERENTIABLE[n]] for n in names], g)
    for name, a, b in zip(names, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_block_eval_gradients_equal_reference(dtype, layout):
    """JointBlock in eval mode (fused forward, registered backward) vs JointBlockReference in eval
    mode: gradients of the input, the residual and every parameter."""
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    block = randomize_(lwkernels.JointBlock(5, 7, stride=2, dilation=2, mid_norm=True, activation="relu6",
                                            bias=True), seed=8).to(dtype).eval()
    ref = block.to_reference().eval()
    gen = torch.Generator().manual_seed(9)
    x = (3 * torch.randn(2, 5, 9, 8, generator=gen, dtype=torch.float64)).to(dtype).contiguous(memory_format=fmt)
    res = torch.randn(2, 7, 5, 4, generator=gen, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    g = torch.randn(2, 7, 5, 4, generator=gen, dtype=torch.float64).to(dtype)
    grads = []
    for m in (block, ref):
        xi, ri = x.clone().requires_grad_(), res.clone().requires_grad_()
        params = list(m.parameters())
        grads.append(torch.autograd.grad(m(xi, ri), [xi, ri] + params, g))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    names = ["x", "residual"] + [n for n, _ in block.named_parameters()]
    assert len(names) == len(grads[0]) == 2 + 8
    for name, a, b in zip(names, *grads):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")
