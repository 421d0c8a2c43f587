"""Non-finite values propagate exactly as in the plain PyTorch composition.

One NaN, +Inf or -Inf in the input, a NaN in the residual, or a NaN in any single weight or
BatchNorm parameter, through a JointBlock in training mode (batch statistics), in eval mode with
autograd recording, and in eval mode under no_grad (the prepared-call path); relu, relu6 and none;
with and without mid BatchNorm and residual; NCHW and channels_last; on every CPU path compiled
here (scalar, avx2, avx512; the training kernels' scalar and avx2 variants), float32 and float64.

The reference is the same modules run as plain nn.Conv2d / nn.BatchNorm2d / activations in float64.
Compared: the output, every gradient (input, residual, each parameter), and the running statistics
after the step. Non-finite positions must be identical (NaN where PyTorch has NaN, +Inf/-Inf where
it has them); finite values within the tolerances of the float32 training tests. Each case also
asserts that the poison reached the reference's output or buffers, so a case cannot pass by
poisoning nothing.

A NaN depthwise weight makes its whole channel NaN, as zero padding multiplies the padded taps
(NaN * 0 = NaN) and PyTorch's float64 convolution computes it; its float32 convolution skips those
taps instead, which is why the reference is float64.

Two more deviations in the reference, both where PyTorch's own CPU result depends on where an element
falls (its vectorised kernels and their scalar tails disagree at a NaN input): relu6's gradient
(vectorised: 0) and hardswish's (vectorised: NaN); the reference uses the vectorised rules
everywhere, and test_relu6_reference_rule / test_hardswish_reference_rule check them against
PyTorch's kernels. In more detail, for relu6: PyTorch's own relu6 gradient at a NaN input depends on where the
element falls (its vectorised CPU kernel gives 0, its scalar tail and CUDA kernel pass the gradient),
so the reference's relu6 uses the vectorised kernel's rule everywhere; test_relu6_reference_rule
checks that rule against PyTorch's kernel.

Infinite weights and BatchNorm parameters are out of scope: folding BatchNorm into one scale and
shift per channel reorders the arithmetic, so inf - inf can come out NaN on one side and +-Inf on
the other (see docs/numerics.md).
"""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from helpers import expected_memory_format, randomize_, torch_threads
from lwkernels import JointBlock

ACTS = ("relu", "relu6", "none", "hardswish", "silu")
MODES = ("train", "eval", "eval_nograd")
C_IN, C_OUT, N, H, W = 5, 6, 2, 7, 9
STRIDE, DILATION = 1, 2

#: (what is poisoned, the value): the input, the residual, then one element of each parameter and
#: BatchNorm buffer. "mid_bn.*" needs mid_norm; "residual" needs a residual.
POISONS = (
    ("x", math.nan), ("x", math.inf), ("x", -math.inf), ("residual", math.nan),
    ("depthwise.weight", math.nan), ("depthwise.bias", math.nan),
    ("pointwise.weight", math.nan), ("pointwise.bias", math.nan),
    ("bn.weight", math.nan), ("bn.bias", math.nan), ("bn.running_mean", math.nan), ("bn.running_var", math.nan),
    ("mid_bn.weight", math.nan), ("mid_bn.bias", math.nan),
    ("mid_bn.running_mean", math.nan), ("mid_bn.running_var", math.nan),
)


class _ReLU6VectorisedRule(torch.autograd.Function):
    """relu6 with PyTorch's vectorised CPU backward rule at every position: grad where 0 < y < 6,
    else 0 (selected, not multiplied: a NaN gradient in the flat region becomes 0)."""

    @staticmethod
    def forward(ctx, v):
        y = torch.nn.functional.relu6(v)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return torch.where((y > 0) & (y < 6), g, torch.zeros((), dtype=g.dtype))


class ReLU6Reference(nn.Module):
    def forward(self, v):
        return _ReLU6VectorisedRule.apply(v)


class _HardswishVectorisedRule(torch.autograd.Function):
    """hardswish with PyTorch's vectorised CPU backward rule at every position: NaN at a NaN input
    (its scalar tail passes the gradient there instead)."""

    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return torch.nn.functional.hardswish(v)

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        return torch.where(torch.isnan(v), v, torch.ops.aten.hardswish_backward(g, v))


class HardswishReference(nn.Module):
    def forward(self, v):
        return _HardswishVectorisedRule.apply(v)


def _poison_id(p):
    return f"{p[0]}={p[1]}"


def _make_block(act: str, mid_norm: bool, dtype: torch.dtype) -> JointBlock:
    block = JointBlock(C_IN, C_OUT, stride=STRIDE, dilation=DILATION, activation=None if act == "none" else act,
                       mid_norm=mid_norm, bias=True, dtype=dtype)
    return randomize_(block, seed=7)


def _inputs(layout: str, residual: bool, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(N, C_IN, H, W, generator=gen, dtype=dtype)
    r = torch.randn(N, C_OUT, H, W, generator=gen, dtype=dtype) if residual else None
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
        r = None if r is None else r.contiguous(memory_format=torch.channels_last)
    return x, r


def _poison_(target: str, value: float, block, x, r) -> None:
    """Writes `value` into one element of the target (an interior pixel of the second channel)."""
    with torch.no_grad():
        if target == "x":
            x[1, 1, 3, 4] = value
        elif target == "residual":
            r[0, 2, 3, 4] = value
        else:
            t = block.get_submodule(target.rpartition(".")[0]).get_buffer(target.rpartition(".")[2]) \
                if "running" in target else block.get_parameter(target)
            t.view(-1)[min(1, t.numel() - 1)] = value


def _assert_parity(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    """Identical non-finite positions (NaN, +Inf, -Inf), finite values within tolerance."""
    a, e = actual.double(), expected.double()
    for name, mask in (("NaN", torch.isnan), ("+Inf", lambda t: t == math.inf), ("-Inf", lambda t: t == -math.inf)):
        ma, me = mask(a), mask(e)
        if not torch.equal(ma, me):
            diff = (ma != me).nonzero()
            raise AssertionError(f"{what}: {name} positions differ at {int((ma != me).sum())} of {a.numel()} "
                                 f"elements (first {diff[0].tolist()}: got {a[tuple(diff[0])].item()}, "
                                 f"PyTorch {e[tuple(diff[0])].item()})")
    finite = torch.isfinite(e)
    torch.testing.assert_close(a[finite], e[finite], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _run(module, mode, x, r, g):
    """One step: forward (and backward unless no_grad). Returns the output."""
    if mode == "eval_nograd":
        with torch.no_grad():
            return module(x, r)
    y = module(x, r)
    (y * g).sum().backward()
    return y


def _check_case(target, value, mode, act, mid_norm, residual, layout, dtype):
    block = _make_block(act, mid_norm, dtype)
    x, r = _inputs(layout, residual, dtype)
    _poison_(target, value, block, x, r)
    ref = copy.deepcopy(block.to_reference()).double()
    if isinstance(ref.act, nn.ReLU6):
        ref.act = ReLU6Reference()
    if isinstance(ref.mid_act, nn.ReLU6):
        ref.mid_act = ReLU6Reference()
    if isinstance(ref.act, nn.Hardswish):
        ref.act = HardswishReference()
    if isinstance(ref.mid_act, nn.Hardswish):
        ref.mid_act = HardswishReference()
    (block.train() if mode == "train" else block.eval())
    (ref.train() if mode == "train" else ref.eval())
    grad = mode != "eval_nograd"
    xs = [x.clone().requires_grad_(grad), x.double().requires_grad_(grad)]
    rs = [None, None] if r is None else [r.clone().requires_grad_(grad), r.double().requires_grad_(grad)]
    g = torch.randn(N, C_OUT, H, W, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    y = _run(block, mode, xs[0], rs[0], g.to(dtype))
    with torch_threads(1):
        y_ref = _run(ref, mode, xs[1], rs[1], g)

    ctx = f"[{target}={value} {mode} act={act} mid_norm={mid_norm} residual={residual} {layout} {dtype}]"
    assert y.is_contiguous(memory_format=expected_memory_format(x)), f"{ctx} memory format"
    out_tol, grad_tol = ((1e-4, 1e-4), (1e-3, 2e-3)) if dtype == torch.float32 else ((1e-9, 1e-9), (1e-8, 1e-8))
    _assert_parity(y, y_ref, *out_tol, f"{ctx} output")
    reached = [y_ref]
    if grad:
        _assert_parity(xs[0].grad, xs[1].grad, *grad_tol, f"{ctx} grad x")
        reached.append(xs[1].grad)
        if r is not None:
            _assert_parity(rs[0].grad, rs[1].grad, *grad_tol, f"{ctx} grad residual")
        for (name, p), (_, p_ref) in zip(block.named_parameters(), ref.named_parameters()):
            assert (p.grad is None) == (p_ref.grad is None), f"{ctx} grad {name}: presence differs"
            if p.grad is not None:
                _assert_parity(p.grad, p_ref.grad, *grad_tol, f"{ctx} grad {name}")
                reached.append(p_ref.grad)
    for (name, b), (_, b_ref) in zip(block.named_buffers(), ref.named_buffers()):
        if b.dtype.is_floating_point:
            _assert_parity(b, b_ref, 1e-5, 1e-5, f"{ctx} {name}")
            reached.append(b_ref)
    saturated = act == "relu6" and math.isinf(value) and not grad  # relu6 clamps +-Inf to 6 / 0
    assert saturated or not all(torch.isfinite(t).all() for t in reached), \
        f"{ctx}: the poison reached none of the reference's outputs, gradients or buffers"


def _applicable(target: str, mid_norm: bool, residual: bool) -> bool:
    return (mid_norm or not target.startswith("mid_bn.")) and (residual or target != "residual")


def _grid(target):
    """act x mid_norm x residual x layout, without the combinations where `target` does not exist."""
    for act, mid_norm, residual, layout in itertools.product(ACTS, (False, True), (False, True), ("nchw", "cl")):
        if _applicable(target, mid_norm, residual):
            yield act, mid_norm, residual, layout


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("poison", POISONS, ids=_poison_id)
def test_float32_each_cpu_path(poison, mode, cpu_isa, single_thread):
    target, value = poison
    for act, mid_norm, residual, layout in _grid(target):
        _check_case(target, value, mode, act, mid_norm, residual, layout, torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("poison", POISONS, ids=_poison_id)
def test_float64(poison, mode, single_thread):
    target, value = poison
    for act, mid_norm, residual, layout in _grid(target):
        _check_case(target, value, mode, act, mid_norm, residual, layout, torch.float64)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_two_threads(mode, cpu_isa):
    """The threaded kernels' partial sums and work split keep the same positions."""
    with torch_threads(2):
        for target, value in (("x", math.nan), ("x", math.inf), ("depthwise.weight", math.nan)):
            _check_case(target, value, mode, "relu", True, True, "nchw", torch.float32)
            _check_case(target, value, mode, "relu6", False, False, "cl", torch.float32)


def test_nan_loss_is_not_hidden_by_training(single_thread):
    """The symptom users saw: one NaN pixel at step 2 of an SGD loop gave finite losses afterwards."""
    torch.manual_seed(0)
    block = JointBlock(4, 8, mid_norm=True, activation="relu").train()
    ref = block.to_reference().train()
    losses = {id(block): [], id(ref): []}
    for m in (block, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for step in range(4):
            x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(step))
            if step == 1:
                x[0, 0, 2, 2] = math.nan
            loss = m(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[id(m)].append(loss.item())
    got, expected = losses[id(block)], losses[id(ref)]
    assert math.isfinite(got[0]) and all(math.isnan(v) for v in got[1:]), got
    assert [math.isnan(v) for v in got] == [math.isnan(v) for v in expected]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_relu6_reference_rule(dtype):
    """The reference's relu6 backward rule is PyTorch's own CPU kernel on the elements its vector loop
    covers (a long tensor's leading elements): NaN, +-Inf, the kinks 0 and 6, and values between."""
    special = torch.tensor([math.nan, math.inf, -math.inf, 0.0, 6.0, -1.0, 3.0, 7.0, 1e-30, 5.999], dtype=dtype)
    v = special.repeat(64)  # long enough that the leading elements take the vectorised loop
    g = torch.arange(1, v.numel() + 1, dtype=dtype)
    g[5] = math.nan  # a NaN gradient where relu6 is flat: selected away, not multiplied
    pytorch = torch.ops.aten.hardtanh_backward(g, v, 0.0, 6.0)[:special.numel()]
    vr = v.clone().requires_grad_()
    _ReLU6VectorisedRule.apply(vr).backward(g)
    torch.testing.assert_close(vr.grad[:special.numel()], pytorch, rtol=0, atol=0)
    assert pytorch[0] == 0 and pytorch[6] == g[6], "the NaN element got the gradient: PyTorch changed its rule"


def test_triton_kernels_in_the_interpreter():
    """tests/triton_nan_cases.py (the Triton kernels on a sample of this grid) in a fresh process
    with TRITON_INTERPRET=1, which must be set before Triton is first imported."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    import lwkernels

    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    package_root = str(Path(lwkernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "pytest", str(here / "triton_nan_cases.py"), "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", "--rootdir", str(here.parent)]
    proc = subprocess.run(cmd, cwd=here.parent, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter cases failed:\n{output[-20000:]}"
    summary = output.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_hardswish_reference_rule(dtype):
    """The reference's hardswish backward rule is PyTorch's own CPU kernel on the elements its vector
    loop covers: NaN gives NaN; the kinks -3 and 3, +-Inf and values between as PyTorch computes them."""
    special = torch.tensor([math.nan, math.inf, -math.inf, -3.0, 3.0, -1.0, 0.5, 7.0, -4.0, 2.999], dtype=dtype)
    v = special.repeat(64)  # long enough that the leading elements take the vectorised loop
    g = torch.arange(1, v.numel() + 1, dtype=dtype)
    pytorch = torch.ops.aten.hardswish_backward(g, v)[:special.numel()]
    vr = v.clone().requires_grad_()
    _HardswishVectorisedRule.apply(vr).backward(g)
    torch.testing.assert_close(vr.grad[:special.numel()], pytorch, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(pytorch[0]), "the NaN element got a number: PyTorch changed its rule"
