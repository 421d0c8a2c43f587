"""LayoutSequential: the members run in the layout chosen for them, the container computes what the
plain nn.Sequential computes and returns it in the input's memory format; fuse() wraps the
outermost containers of fused blocks."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn

from helpers import randomize_, tolerance
from lwkernels import ConvBNAct, InvertedResidual, JointBlock, fuse
from lwkernels.nn.layout_sequential import LayoutSequential, preferred_memory_format

CL, NCHW = torch.channels_last, torch.contiguous_format


def _stages(dtype=torch.float32) -> nn.Sequential:
    """A small MobileNetV2-like stack whose blocks straddle the layout rule: a 3x3 stem, inverted
    residuals at 56x56 -> 28x28 -> 14x14 (a 5x5 one at each size), a 1x1 head."""
    mods = [
        ConvBNAct(3, 16, 3, stride=2),                          # 112 -> 56: NCHW
        InvertedResidual(16, 24, 6, stride=1),                  # 56x56 out: NCHW
        InvertedResidual(24, 24, 3, stride=2, kernel_size=5),   # 28x28 out, 5x5: NCHW
        InvertedResidual(24, 40, 6, stride=1),                  # 28x28 out, 3x3: channels_last
        InvertedResidual(40, 40, 3, stride=2, kernel_size=5),   # 14x14 out, 5x5: channels_last
        nn.ReLU(),
        JointBlock(40, 72, stride=1),                           # 14x14: channels_last
        ConvBNAct(72, 96, 1, padding=0),                        # 1x1: keeps what it is given
    ]
    return randomize_(nn.Sequential(*mods).to(dtype), seed=5).eval()


def _formats_seen(seq: nn.Sequential, x: torch.Tensor):
    seen = []
    hooks = [m.register_forward_pre_hook(
        lambda m, args: seen.append(CL if (args[0].is_contiguous(memory_format=CL) and not args[0].is_contiguous())
                                    else NCHW)) for m in seq]
    try:
        with torch.no_grad():
            y = seq(x)
    finally:
        for h in hooks:
            h.remove()
    return y, seen


def test_preferred_memory_format_follows_the_rule():
    ir = InvertedResidual(24, 24, 6)
    assert preferred_memory_format(ir, (1, 24, 56, 56)) == NCHW
    assert preferred_memory_format(ir, (1, 24, 28, 28)) == CL
    assert preferred_memory_format(InvertedResidual(24, 24, 6, stride=2), (1, 24, 56, 56)) == CL  # 28x28 out
    assert preferred_memory_format(InvertedResidual(24, 24, 6, kernel_size=5), (1, 24, 28, 28)) == NCHW
    assert preferred_memory_format(InvertedResidual(24, 24, 6, kernel_size=5), (1, 24, 14, 14)) == CL
    # A JointBlock: NCHW on a large image, whatever it is given on a small one (no conversion pays).
    assert preferred_memory_format(JointBlock(24, 32), (8, 24, 56, 56)) == NCHW
    assert preferred_memory_format(JointBlock(24, 32), (8, 24, 7, 7)) is None
    assert preferred_memory_format(ConvBNAct(3, 16, 3, stride=2), (1, 3, 224, 224)) == NCHW
    assert preferred_memory_format(ConvBNAct(16, 32, 1, padding=0), (1, 16, 7, 7)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_format", ["nchw", "channels_last"])
def test_matches_plain_sequential_and_keeps_the_input_format(dtype, in_format):
    plain = _stages(dtype)
    seq = LayoutSequential(collections.OrderedDict(plain.named_children())).eval()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if in_format == "channels_last":
        x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        want = plain(x)
        for _ in range(3):  # the first call records the shapes, the next ones use the plan
            got = seq(x)
            assert got.is_contiguous(memory_format=CL if in_format == "channels_last" else NCHW)
            rtol, atol = tolerance(dtype, 96 * 9)
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_members_get_the_layout_chosen_for_them():
    seq = LayoutSequential(collections.OrderedDict(_stages().named_children()))
    x = torch.randn(1, 3, 112, 112)
    _, first = _formats_seen(seq, x)
    assert first == [NCHW] * 8  # recording call: a plain nn.Sequential
    _, seen = _formats_seen(seq, x)
    # stem, 56x56, 5x5 at 28x28 in NCHW; the 3x3 at 28x28, the 5x5 at 14x14, ReLU (kept), the
    # JointBlock and the 1x1 ConvBNAct (kept) channels-last
    assert seen == [NCHW, NCHW, NCHW, CL, CL, CL, CL, CL]


@pytest.mark.parametrize("blocks", [3, 4])
@pytest.mark.parametrize("in_format", [NCHW, CL])
def test_a_run_of_four_joint_blocks_runs_channels_last(in_format, blocks):
    # A depthwise-separable stack (no inverted residuals): converting around fewer than four
    # JointBlocks cost more than they gained, so they run in the caller's layout; four or more run
    # channels-last, converting once at each end (the output in the caller's layout).
    specs = [(16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1)][:blocks]
    plain = randomize_(nn.Sequential(*[JointBlock(ci, co, stride=s) for ci, co, s in specs]), seed=3).eval()
    seq = LayoutSequential(collections.OrderedDict(plain.named_children()))
    x = torch.randn(1, 16, 56, 56).contiguous(memory_format=in_format)
    _formats_seen(seq, x)
    y, seen = _formats_seen(seq, x)
    assert seen == [CL if blocks >= 4 else in_format] * blocks
    assert y.is_contiguous(memory_format=in_format)
    with torch.no_grad():
        torch.testing.assert_close(y, plain(x), rtol=1e-4, atol=1e-5)


def test_narrow_or_double_joint_blocks_keep_the_input_layout():
    plain = randomize_(nn.Sequential(*[JointBlock(8, 8) for _ in range(5)]), seed=4).eval()  # < 16 channels
    seq = LayoutSequential(collections.OrderedDict(plain.named_children()))
    x = torch.randn(1, 8, 20, 20)
    _formats_seen(seq, x)
    assert _formats_seen(seq, x)[1] == [NCHW] * 5
    wide = randomize_(nn.Sequential(*[JointBlock(16, 16) for _ in range(4)]), seed=5).double().eval()
    seq = LayoutSequential(collections.OrderedDict(wide.named_children()))
    x = torch.randn(1, 16, 20, 20, dtype=torch.float64)
    _formats_seen(seq, x)
    assert _formats_seen(seq, x)[1] == [NCHW] * 4


def test_members_that_leave_four_dimensions():
    # A whole classifier as one container: the pooled, flattened output keeps no layout.
    plain = nn.Sequential(*_stages(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10)).eval()
    seq = LayoutSequential(collections.OrderedDict(plain.named_children()))
    x = torch.randn(2, 3, 112, 112).contiguous(memory_format=CL)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(seq(x), plain(x), rtol=1e-4, atol=1e-5)


def test_plain_path_when_grad_is_needed_or_tracing():
    seq = LayoutSequential(collections.OrderedDict(_stages().named_children()))
    x = torch.randn(1, 3, 112, 112)
    _formats_seen(seq, x)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous())) for m in seq]
    y = seq(x)  # grad enabled: the members see what nn.Sequential gives them
    assert all(seen) and y.requires_grad
    for h in hooks:
        h.remove()
    exported = torch.export.export(seq, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), seq(x), rtol=1e-4, atol=1e-5)


def test_new_members_and_new_shapes_get_new_plans():
    seq = LayoutSequential(collections.OrderedDict(_stages().named_children()))
    x = torch.randn(1, 3, 112, 112)
    _formats_seen(seq, x)
    seq[3] = randomize_(InvertedResidual(24, 40, 6, kernel_size=5), seed=9).eval()  # now NCHW at 28x28
    _formats_seen(seq, x)
    y, seen = _formats_seen(seq, x)
    assert seen[3] == NCHW and seen[4] == CL
    plain = nn.Sequential(collections.OrderedDict(seq.named_children()))
    with torch.no_grad():
        torch.testing.assert_close(y, plain(x), rtol=1e-4, atol=1e-5)
    small = torch.randn(1, 3, 56, 56)  # every block at 28x28 or less
    _formats_seen(seq, small)
    _, seen = _formats_seen(seq, small)
    assert seen[1] == CL


def test_state_dict_indexing_and_copies_are_nn_sequentials():
    plain = _stages()
    seq = LayoutSequential(collections.OrderedDict(plain.named_children()))
    assert list(seq.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        seq(torch.randn(1, 3, 112, 112))
    clone = copy.deepcopy(seq)
    assert "_layout_plans" not in clone.__dict__
    assert isinstance(seq[1:3], LayoutSequential) and len(seq) == 8


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Sequential(  # an inverted residual written out: expand, depthwise, project
                nn.Conv2d(16, 96, 1, bias=False), nn.BatchNorm2d(96), nn.ReLU6(),
                nn.Conv2d(96, 96, 3, 2, 1, groups=96, bias=False), nn.BatchNorm2d(96), nn.ReLU6(),
                nn.Conv2d(96, 24, 1, bias=False), nn.BatchNorm2d(24)),
        )
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_fuse_wraps_the_outermost_container_of_fused_blocks():
    net = randomize_(_Net(), seed=2).eval()
    fused, report = fuse(net)
    assert report.layout_sequentials == ["features"]
    assert type(fused.features) is LayoutSequential
    assert type(fused.features[3]) is nn.Sequential  # the inner one stays plain
    keys = report.key_map()
    assert set(fused.state_dict()) == {keys.get(k, k) for k in net.state_dict()}
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        want = net(x)
        for _ in range(2):
            torch.testing.assert_close(fused(x), want, rtol=1e-4, atol=1e-5)
