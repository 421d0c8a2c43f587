"""ConvBNAct (lwkernels/nn/conv_bn_act.py, cpu/prepared_dense_conv.py, csrc/dense_conv.h): the
network stem Conv2d -> BatchNorm2d -> activation. Its native eager CPU path agrees with the plain
modules on a grid of awkward shapes on every CPU path, sees every change to what it reads, and
leaves everything else (training, autograd, other layouts and dtypes, export) to the plain modules."""
import itertools

import pytest
import torch
from torch import nn

import lwkernels
from lwkernels import ConvBNAct, to_reference
from lwkernels.cpu.prepared_dense_conv import PreparedDenseConv
from helpers import cpu_paths_here, forced_isa, randomize_, tolerance

ACTS = ["relu", "relu6", "hardswish", "silu", None]


@pytest.fixture
def replays(monkeypatch):
    count = {"n": 0}
    run = PreparedDenseConv.run

    def counting(self, x):
        count["n"] += 1
        return run(self, x)

    monkeypatch.setattr(PreparedDenseConv, "run", counting)
    return count


def _stem(cin=3, cout=32, k=3, stride=2, padding=None, dilation=1, act="relu", bias=False, seed=0):
    return randomize_(ConvBNAct(cin, cout, k, stride, padding, dilation, activation=act, bias=bias), seed).eval()


def _x(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _check(m, x):
    """m(x) on the fast path equals the plain modules (in float64) within the accumulation tolerance."""
    with torch.no_grad():
        y = m(x)
        ref = to_reference(m).double()(x.double())
    taps = m[0].in_channels * m[0].kernel_size[0] * m[0].kernel_size[1]
    rtol, atol = tolerance(x.dtype, taps)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.is_contiguous()
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol, equal_nan=True)
    return y


# (C_in, k, stride, padding, dilation) with at most 64 taps (construction refuses more: tested below).
GRID = [g for g in itertools.product([1, 3, 4], [1, 3, 5], [1, 2, 3], [0, 1, 2], [1, 2]) if g[0] * g[1] ** 2 <= 64]


@pytest.mark.parametrize("isa", cpu_paths_here())
@pytest.mark.parametrize("cin,k,stride,padding,dilation", GRID)
def test_matches_plain_modules(replays, isa, cin, k, stride, padding, dilation):
    v = GRID.index((cin, k, stride, padding, dilation))
    m = _stem(cin, 1 + v % 13, k, stride, padding, dilation, act=ACTS[v % 5], bias=v % 2 == 0, seed=v)
    h, w = [(5, 7), (17, 9), (33, 70), (1, 1)][v % 4]
    if (h + 2 * padding - dilation * (k - 1) - 1) < 0 or (w + 2 * padding - dilation * (k - 1) - 1) < 0:
        h, w = h + dilation * k, w + dilation * k
    with forced_isa(isa):
        for dtype in (torch.float32, torch.float64):
            _check(m.to(dtype), _x(1 + v % 2, cin, h, w, seed=v, dtype=dtype))
    assert replays["n"] == 2


def test_the_mobile_stem_at_224():
    m = _stem()
    for batch in (1, 3):
        _check(m, _x(batch, 3, 224, 224))


def test_replay_sees_every_change(replays):
    m, x = _stem(), _x(2, 3, 20, 20)
    with torch.no_grad():
        m(x)
        m(x)
        assert replays["n"] == 2
        m[0].weight.mul_(1.5)
        _check(m, x)
        m[1].running_var.add_(0.5)
        _check(m, x)
        m[1].eps = 1e-2
        _check(m, x)
        m[0].weight = nn.Parameter(torch.randn_like(m[0].weight))
        _check(m, x)
        m[2] = nn.Hardswish()
        _check(m, x)
        lwkernels.clear_cache()
        _check(m, x)
        hooked = []
        h = m[0].register_forward_hook(lambda mod, i, o: hooked.append(1))
        n = replays["n"]
        _check(m, x)
        h.remove()
        assert hooked and replays["n"] == n  # the hook fired: the plain modules ran


def test_training_autograd_and_other_inputs_run_the_plain_modules(replays):
    m, x = _stem(), _x(2, 3, 16, 16)
    plain = to_reference(m)
    m.train()
    plain.train()
    y = m(x)
    torch.testing.assert_close(y, plain(x))
    torch.testing.assert_close(m[1].running_mean, plain[1].running_mean)
    y.sum().backward()
    assert m[0].weight.grad is not None
    m.eval()
    with torch.no_grad():
        m(x.contiguous(memory_format=torch.channels_last))
        m(x[:, :, :, ::2])  # not dense
        with pytest.raises(RuntimeError):
            m(x.double())  # PyTorch's dtype error, not a silent conversion
    assert replays["n"] == 0
    m.eval()
    y = m(x)  # grad enabled and parameters require grad: autograd through the plain modules
    assert y.requires_grad and replays["n"] == 0


def test_state_dict_is_sequentials_and_to_reference_is_plain():
    m = _stem()
    seq = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
    assert list(m.state_dict()) == list(seq.state_dict())
    seq.load_state_dict(m.state_dict())
    ref = to_reference(m)
    assert type(ref) is nn.Sequential
    x = _x(1, 3, 31, 31)
    with torch.no_grad():
        torch.testing.assert_close(m(x), seq.eval()(x), rtol=1e-5, atol=1e-5)


def test_construction_errors_name_the_problem():
    with pytest.raises(ValueError, match="at most 64"):
        ConvBNAct(8, 16, 3)
    with pytest.raises(ValueError, match="groups=1"):
        ConvBNAct.from_modules(nn.Conv2d(4, 4, 3, groups=2), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match="BatchNorm2d"):
        ConvBNAct.from_modules(nn.Conv2d(3, 4, 3), nn.Identity(), nn.ReLU())
    with pytest.raises(ValueError, match="activation"):
        ConvBNAct.from_modules(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU())


def test_bad_input_gets_pytorchs_error():
    m = _stem()
    with torch.no_grad(), pytest.raises(RuntimeError, match="channels"):
        m(_x(1, 4, 16, 16))
    with torch.no_grad(), pytest.raises(RuntimeError):
        m(_x(1, 3, 1, 1)[:, :, :0])  # empty image


def test_nan_and_inf_inputs_match_the_plain_modules():
    m, x = _stem(act="relu6"), _x(1, 3, 12, 12)
    x[0, 1, 3, 4] = float("nan")
    x[0, 2, 7, 7] = float("inf")
    y = _check(m, x)
    with torch.no_grad():
        ref = to_reference(m)(x)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))


def test_export_and_compile_see_the_plain_modules():
    m, x = _stem(), _x(1, 3, 16, 16)
    with torch.no_grad():
        expected = m(x)
        exported = torch.export.export(m, (x,))
    torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-5)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert any("conv" in t for t in targets) and any("batch_norm" in t for t in targets), targets


# -- 1x1 convolutions: the joint block's GEMM kernel -----------------------------------------------

POINTWISE = list(itertools.product([8, 64, 130], [5, 96], [1, 2], [0, 1], [False, True]))


@pytest.mark.parametrize("isa", cpu_paths_here())
@pytest.mark.parametrize("cin,cout,stride,padding,channels_last", POINTWISE)
def test_1x1_matches_plain_modules(replays, isa, cin, cout, stride, padding, channels_last):
    v = POINTWISE.index((cin, cout, stride, padding, channels_last))
    m = _stem(cin, cout, 1, stride, padding, act=ACTS[v % 5], bias=v % 3 == 0, seed=v)
    h, w = [(7, 7), (14, 13), (1, 1), (28, 9)][v % 4]
    with forced_isa(isa):
        for dtype in (torch.float32, torch.float64):
            x = _x(1 + v % 2, cin, h, w, seed=v, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            m64 = m.to(dtype)
            y = _check_layout(m64, x)
            assert y.dtype == dtype
    assert replays["n"] == 2


def _check_layout(m, x):
    """Like _check, for any input layout: values and the output's memory format match the plain modules."""
    with torch.no_grad():
        y = m(x)
        plain = to_reference(m)
        ref = plain.double()(x.double())
        ref_layout = to_reference(m)(x)
    rtol, atol = tolerance(x.dtype, m[0].in_channels)
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert y.is_contiguous(memory_format=fmt) == ref_layout.is_contiguous(memory_format=fmt)
    return y


def test_1x1_replay_sees_weight_changes(replays):
    m, x = _stem(32, 64, 1, 1, 0), _x(2, 32, 9, 9)
    with torch.no_grad():
        m(x)
        m[0].weight.mul_(-1)  # in place: the packed weights must follow
        _check(m, x)
        m[1].weight.add_(0.5)
        _check(m, x)
    assert replays["n"] == 3
