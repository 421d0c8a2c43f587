"""LayoutSequential's replay (cpu/prepared_sequence.py, nn/member_calls.py): the members whose forward
is known run as their prepared kernel calls, the others as modules; the result is exactly what
calling the members gives, and every change the members' own fast paths would notice stops the
replay."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lwkernels
import lwkernels.nn.layout_sequential as layout_sequential
from helpers import randomize_
from lwkernels import InvertedResidual, JointBlock, LayoutSequential, fuse
from lwkernels.cpu.prepared_sequence import PreparedSequence

CL = torch.channels_last


class Residual(nn.Module):
    """A hand-written inverted residual with its add in forward (fuse() makes a GraphModule of it)."""

    def __init__(self, c: int, e: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
            nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
            nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


class Scale(nn.Module):
    """A member whose forward is not known: always called as a module."""

    def __init__(self, to_channels_last: bool = False) -> None:
        super().__init__()
        self.to_channels_last = to_channels_last

    def forward(self, x):
        y = x * 1.5
        return y.contiguous(memory_format=CL) if self.to_channels_last else y


def _plain_model() -> nn.Sequential:
    def ir(cin, e, cout, stride, k=3):
        return nn.Sequential(
            nn.Conv2d(cin, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
            nn.Conv2d(e, e, k, stride, k // 2, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
            nn.Conv2d(e, cout, 1, bias=False), nn.BatchNorm2d(cout))
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),  # 0 stem
        ir(16, 48, 24, 2),                                                                    # 1
        Residual(24, 72),                                                                     # 2
        Scale(),                                                                              # 3
        nn.Sequential(ir(24, 72, 32, 2, 5), nn.Identity()),                                   # 4
        Residual(32, 96),                                                                     # 5
        nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False), nn.BatchNorm2d(32),  # 6 joint
                      nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()),
    )
    return randomize_(model, seed=3).eval()


def _fused(dtype=torch.float32):
    model, report = fuse(_plain_model().to(dtype))
    assert isinstance(model, LayoutSequential), report
    return model


def _replay(model: LayoutSequential):
    plans = model.__dict__["_layout_plans"]
    assert len(plans) == 1
    return next(iter(plans.values())).replay


def _modules_path(model, x):
    layout_sequential.REPLAY_MEMBERS = False
    try:
        return model(x)
    finally:
        layout_sequential.REPLAY_MEMBERS = True


def _input(dtype=torch.float32, channels_last=False, batch=2):
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(7), dtype=dtype)
    return x.contiguous(memory_format=CL) if channels_last else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_replays_known_members_and_gives_what_calling_them_gives(dtype, channels_last):
    original = _plain_model().to(dtype)
    model = _fused(dtype)
    x = _input(dtype, channels_last)
    with torch.no_grad():
        want = original(x)
        for _ in range(3):
            model(x)
        replay = _replay(model)
        assert replay is not None
        # The stem, the inverted residuals (also inside a container with an nn.Identity), both
        # GraphModules of the hand-written residual blocks and the JointBlock replay; Scale does not.
        assert [step is not None for step in replay._steps] == [True, True, True, False, True, True, True]
        got = model(x)
        assert torch.equal(got, _modules_path(model, x))
        assert got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
        torch.testing.assert_close(got, want, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-5)


def _set_weight(m):
    conv = m[1][0][0][0]  # the first inverted residual's expand conv
    conv.weight = nn.Parameter(torch.randn_like(conv.weight))


def _replace_block(m):
    old = m[4][0][0]
    new = InvertedResidual.from_modules(copy.deepcopy(old[0]), copy.deepcopy(old[1]))
    with torch.no_grad():
        new[1].pointwise.weight.mul_(-1)
    m[4][0][0] = new


def _patch_forward(m):
    m[4].forward = lambda x: m[4][0](x) * 2


def _swap_activation(m):
    m[0][2] = nn.Hardswish()


MUTATIONS = {
    "running mean updated in place": lambda m: m[2].conv[0][0][1].running_mean.add_(0.5),
    "depthwise weight updated in place": lambda m: m[6][0].depthwise.weight.mul_(2),
    "expand weight replaced": _set_weight,
    "fused block replaced inside a container": _replace_block,
    "forward set on a container instance": _patch_forward,
    "stem activation swapped": _swap_activation,
    "batch norm put in training mode": lambda m: m[6][0].bn.train(),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_replay_sees_what_the_modules_would(mutation):
    model = _fused()
    x = _input()
    with torch.no_grad():
        for _ in range(3):
            before = model(x)
        assert _replay(model) is not None
        MUTATIONS[mutation](model)
        for _ in range(3):  # a stale replay, the modules' path, then a fresh replay
            got = model(x)
            assert torch.equal(got, _modules_path(model, x)), mutation
        assert not torch.equal(got, before), "the mutation must change the output for this test to mean anything"


def test_hooks_stop_the_replay_and_run():
    model = _fused()
    x = _input()
    calls = []
    with torch.no_grad():
        for _ in range(3):
            want = model(x)
        handle = model[2].conv[0][0].register_forward_hook(lambda *args: calls.append(1))  # inside a GraphModule member
        for _ in range(3):
            assert torch.equal(model(x), want)
        assert len(calls) == 3
        handle.remove()
        global_handle = nn.modules.module.register_module_forward_pre_hook(lambda *args: calls.append(2))
        try:
            model(x)
        finally:
            global_handle.remove()
        assert 2 in calls
        for _ in range(16):
            assert torch.equal(model(x), want)
        assert _replay(model) is not None  # prepared again (after a back-off) once the hooks are gone


def test_a_failing_replay_is_not_prepared_on_every_call(monkeypatch):
    model = _fused()
    x = _input(batch=1)
    tries = []
    prepare = PreparedSequence.prepare
    monkeypatch.setattr(PreparedSequence, "prepare", classmethod(lambda cls, *a: tries.append(1) or prepare(*a)))
    model[1].register_forward_pre_hook(lambda *args: None)  # the replay never matches while it is there
    with torch.no_grad():
        for _ in range(200):
            model(x)
    assert 1 <= len(tries) <= 8


def test_parameters_changing_between_calls_back_off():
    model = _fused()
    x = _input(batch=1)
    tries = []
    prepare = PreparedSequence.prepare

    def counting(*args):
        tries.append(1)
        return prepare(*args)

    with torch.no_grad():
        layout_sequential.PreparedSequence.prepare = counting
        try:
            for _ in range(200):
                model[6][0].bn.running_mean.add_(1e-3)  # an update between every pair of calls
                assert torch.equal(model(x), _modules_path(model, x))
        finally:
            layout_sequential.PreparedSequence.prepare = prepare
    assert 1 <= len(tries) <= 10


def test_clear_cache_drops_the_replay():
    model = _fused()
    x = _input()
    with torch.no_grad():
        for _ in range(3):
            want = model(x)
        old = _replay(model)
        lwkernels.clear_cache()
        assert not old.matches()
        for _ in range(8):  # (a replay that went stale this soon is prepared again a few calls later)
            assert torch.equal(model(x), want)
        assert _replay(model) is not None and _replay(model) is not old


def test_a_member_given_another_layout_than_prepared_runs_as_a_module():
    model = _fused()
    x = _input()
    with torch.no_grad():
        for _ in range(3):
            model(x)
        assert _replay(model) is not None
        model[3].to_channels_last = True  # Scale (called as a module) now hands on channels_last
        got = model(x)
        assert torch.equal(got, _modules_path(model, x))


def test_a_graph_module_edited_without_recompile_is_called_as_a_module():
    model = _fused()
    gm = model[2]
    assert isinstance(gm, torch.fx.GraphModule)
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    with gm.graph.inserting_after(node):
        gm.graph.call_function(torch.relu, (node,))  # (no recompile: its forward is the old code)
    x = _input()
    with torch.no_grad():
        for _ in range(3):
            model(x)
        assert [s is not None for s in _replay(model)._steps][2] is False


def test_a_joint_block_subclass_is_called_as_a_module():
    class MyBlock(JointBlock):
        def forward(self, x, residual=None):
            return super().forward(x, residual) + 1

    block = JointBlock(16, 24).eval()
    mine = MyBlock.from_modules(block.depthwise, block.pointwise, block.bn, block.act, block.mid_bn, block.mid_act)
    model = LayoutSequential(JointBlock(8, 16).eval(), mine).eval()
    x = torch.randn(1, 8, 20, 20)
    with torch.no_grad():
        for _ in range(3):
            got = model(x)
        assert [s is not None for s in _replay(model)._steps] == [True, False]
        assert torch.equal(got, _modules_path(model, x))


def test_threads_replaying_one_model_at_once_get_their_own_results():
    import threading

    model = _fused()
    inputs = [_input(batch=1) * (i + 1) for i in range(4)]
    with torch.no_grad():
        for _ in range(3):
            model(inputs[0])
        want = [_modules_path(model, x) for x in inputs]
    assert _replay(model) is not None
    errors = []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    if not torch.equal(model(inputs[i]), want[i]):
                        errors.append(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
