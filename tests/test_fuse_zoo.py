"""fuse() on the structures of the model libraries (timm, torchvision) and on hand-written forward()s:
the chains it must fuse (exact paths and roles), the near-misses it must report, and outputs that
stay the same. The stand-ins live in tests/zoo_modules.py; the real libraries are tested at the end
when they are importable."""
from __future__ import annotations

import copy
import io
from typing import Callable, Dict, Optional, Set, Tuple

import pytest
import torch

import lwkernels
from torch import nn

from lwkernels import JointBlock
from lwkernels.nn.classifier_forward import installed
from lwkernels.nn.fuse import fuse, to_reference
from lwkernels.ops.activation import ACTIVATIONS
from test_fuse import Plain, assert_nothing_else_changed, randomize
from zoo_modules import (Conv2dNormActivation, Conv2dSame, DataDependent, DepthwiseSeparableConv,
                         FunctionalReluBlock, InvertedResidual, MixedConv2d, ScaledNorm, SharedNormBlock,
                         SharedReluBlock, SqueezeExcite, TimmLikeNet, TorchvisionV3Block, TrainingBranchBlock)

MID_BN = {"depthwise", "mid_bn", "pointwise", "bn"}
Expected = Dict[str, Tuple[Set[str], Optional[str]]]  # fused path -> (roles, owner)


def supports(act: str) -> bool:
    return act in ACTIVATIONS


# -- the models -------------------------------------------------------------------------------------------

def timm_like() -> nn.Module:
    ds_unknown_norm = DepthwiseSeparableConv(32, 32)
    ds_unknown_norm.bn1 = ScaledNorm(32)
    return TimmLikeNet([
        [DepthwiseSeparableConv(16, 16)],                                            # 0 skip: residual
        [DepthwiseSeparableConv(16, 24, stride=2, pw_act=True, act_layer=nn.ReLU6)],  # 1 act in both norms
        [InvertedResidual(24, 24, exp_ratio=3, dilation=2),                           # 2.0 expand + residual
         InvertedResidual(24, 32, dw_kernel_size=5, stride=2)],                       # 2.1 no residual
        [DepthwiseSeparableConv(32, 32, se_layer=SqueezeExcite)],                     # 3 SE between dw and pw
        [DepthwiseSeparableConv(32, 32, conv_dw=Conv2dSame(32, 32, 3, groups=32))],   # 4 run-time padding
        [DepthwiseSeparableConv(32, 32, conv_dw=MixedConv2d(32))],                    # 5 split kernels
        [DepthwiseSeparableConv(32, 32, act_layer=nn.Hardswish, noskip=True)],        # 6 hardswish
        [InvertedResidual(32, 32, exp_ratio=2, act_layer=nn.SiLU)],                   # 7 SiLU
        [ds_unknown_norm],                                                            # 8 unknown norm
        [DepthwiseSeparableConv(32, 32, act_layer=None, noskip=True)],                # 9 identity acts
    ])


def timm_like_expected() -> Tuple[Expected, Dict[str, str]]:
    fused: Expected = {
        "blocks.0.0.conv_dw": (MID_BN | {"add"}, "blocks.0.0"),
        "blocks.1.0.conv_dw": (MID_BN, None),
        "blocks.2.0.conv_dw": (MID_BN | {"add"}, "blocks.2.0"),
        "blocks.2.1.conv_dw": (MID_BN, None),
        "blocks.9.0.conv_dw": (MID_BN, None),
    }
    skipped = {
        "blocks.3.0.conv_dw": "2 users",
        "blocks.4.0.conv_dw": "Conv2dSame overrides Conv2d.forward",
        "blocks.5.0.conv_dw": "MixedConv2d",
        "blocks.8.0.conv_dw": "unknown norm subclass ScaledNorm",
    }
    if supports("hardswish"):
        fused["blocks.6.0.conv_dw"] = (MID_BN, None)
    else:
        skipped["blocks.6.0.conv_dw"] = "activation hardswish (in blocks.6.0.bn1) is not supported by the op"
    if supports("silu"):
        fused["blocks.7.0.conv_dw"] = (MID_BN | {"add"}, "blocks.7.0")
    else:
        skipped["blocks.7.0.conv_dw"] = "activation silu (in blocks.7.0.bn2) is not supported by the op"
    return fused, skipped


def torchvision_like() -> nn.Module:
    return nn.Sequential(
        Conv2dNormActivation(3, 16, stride=2),
        TorchvisionV3Block(16, 16, 16, 3, 1),                                   # 1 no expansion, residual
        TorchvisionV3Block(16, 48, 24, 5, 2, activation_layer=nn.Hardswish),    # 2 hardswish
        TorchvisionV3Block(24, 72, 24, 3, 1),                                   # 3 expansion, residual
    )


def torchvision_like_expected() -> Tuple[Expected, Dict[str, str]]:
    relu_chain = {"depthwise", "mid_bn", "mid_act", "pointwise", "bn", "add"}
    fused: Expected = {"1.block.0.0": (relu_chain, "1"), "3.block.1.0": (relu_chain, "3")}
    skipped = {}
    if supports("hardswish"):
        fused["2.block.1.0"] = ({"depthwise", "mid_bn", "mid_act", "pointwise", "bn"}, None)
    else:
        skipped["2.block.1.0"] = "activation hardswish (Hardswish (2.block.1.2)) is not supported by the op"
    return fused, skipped


def hand_written() -> nn.Module:
    hooked = FunctionalReluBlock(12)
    hooked.bn2.register_forward_hook(lambda m, i, o: None)
    return nn.Sequential(FunctionalReluBlock(8), SharedReluBlock(8, 12), SharedNormBlock(12),
                         TrainingBranchBlock(12), hooked)


def hand_written_expected() -> Tuple[Expected, Dict[str, str]]:
    fused: Expected = {
        "0.dw": ({"depthwise", "mid_bn", "mid_act", "pointwise", "bn", "add", "act"}, "0"),
        "1.dw": ({"depthwise", "mid_bn", "mid_act", "pointwise", "bn", "act"}, "1"),
    }
    skipped = {"2.dw": "bn is called 2 times", "3.dw": "differs between training and eval mode",
               "4.dw": "modules with hooks would stop firing: 4.bn2"}
    return fused, skipped


CASES: Dict[str, Tuple[Callable[[], nn.Module], Callable[[], Tuple[Expected, Dict[str, str]]], Tuple[int, ...]]] = {
    "timm": (timm_like, timm_like_expected, (2, 3, 32, 32)),
    "torchvision": (torchvision_like, torchvision_like_expected, (2, 3, 24, 24)),
    "hand_written": (hand_written, hand_written_expected, (2, 8, 15, 13)),
}


# -- checks -------------------------------------------------------------------------------------------------

def assert_report(report, fused_expected: Expected, skipped_expected: Dict[str, str]) -> None:
    assert {c.path: (set(c.modules), c.owner) for c in report.fused} == fused_expected, str(report)
    skipped = {s.path: s.reason for s in report.skipped}
    assert set(skipped) == set(skipped_expected), str(report)
    for path, fragment in skipped_expected.items():
        assert fragment in skipped[path], (path, skipped[path])


def assert_same_function(model: nn.Module, fused: nn.Module, shape) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(to_reference(fused)(x), expected, rtol=0, atol=0)  # same ops, same order
        for _ in range(3):  # later calls replay: LayoutSequential's layouts and members, the prepared calls
            torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
        fused64, model64 = copy.deepcopy(fused).double(), copy.deepcopy(model).double()
        torch.testing.assert_close(fused64(x.double()), model64(x.double()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fuses_library_structures_in_eval(case):
    build, expected, shape = CASES[case]
    model = randomize(build(), seed=4).eval()
    original = copy.deepcopy(model)
    fused, report = fuse(model)
    assert_report(report, *expected())
    assert report.fallbacks == []
    assert_nothing_else_changed(original, fused, report)
    assert sum(isinstance(m, JointBlock) for m in fused.modules()) == len(report.fused)
    assert_same_function(model, fused, shape)


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_mode_is_fused_and_gradients_match(case):
    """BatchNorm in training mode fuses too: JointBlock uses batch statistics like nn.BatchNorm2d.
    float64, so that the comparison sees the fused training op, not float32 rounding through a deep
    network's backward."""
    build, _, shape = CASES[case]
    torch.manual_seed(0)
    model = randomize(build(), seed=5).double().train()
    fused, report = fuse(model)
    assert report.fused and fused.training
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y_ref, y = model(x), fused(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    key_map = report.key_map()
    old_name = {new: old for old, new in key_map.items()}
    grads = dict(model.named_parameters())
    assert len(list(fused.parameters())) == len(grads)
    for name, p in fused.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[old_name.get(name, name)].grad, rtol=1e-8, atol=1e-10)
    for k, v in model.state_dict().items():  # running statistics updated the same way
        torch.testing.assert_close(fused.state_dict()[key_map.get(k, k)], v, rtol=1e-10, atol=1e-12)


def test_act_carrying_norm_shares_its_tensors_and_keeps_the_block_shape():
    model = randomize(timm_like(), seed=6).eval()
    fused, report = fuse(model, inplace=True)
    ds = fused.blocks[1][0]  # swapped in place: the block keeps its class and forward()
    assert type(ds) is DepthwiseSeparableConv and isinstance(ds.conv_dw, JointBlock)
    assert isinstance(ds.bn1, nn.Identity) and isinstance(ds.bn2, nn.Identity)
    block = ds.conv_dw
    assert type(block.mid_bn) is nn.BatchNorm2d and type(block.bn) is nn.BatchNorm2d  # the act is applied once
    assert isinstance(block.mid_act, nn.ReLU6) and isinstance(block.act, nn.ReLU6)
    chain = next(c for c in report.fused if c.path == "blocks.1.0.conv_dw")
    assert chain.key_map["blocks.1.0.bn1.running_var"] == "blocks.1.0.conv_dw.mid_bn.running_var"
    assert chain.key_map["blocks.1.0.bn2.num_batches_tracked"] == "blocks.1.0.conv_dw.bn.num_batches_tracked"
    # A residual block is traced: a GraphModule of that block only, its children kept by name. Its
    # expansion (conv_pw, then bn1 with its activation) and the JointBlock after it are paired into
    # one lwkernels.InvertedResidual in conv_pw's slot, called once with the residual; bn1's tensors
    # are shared by a plain BatchNorm2d in it, its activation applied once.
    ir = fused.blocks[2][0]
    assert isinstance(ir, torch.fx.GraphModule) and type(ir).__name__ == "InvertedResidual"
    pair = ir.conv_pw
    assert isinstance(pair, lwkernels.InvertedResidual) and isinstance(pair[1], JointBlock)
    assert isinstance(ir.bn1, nn.Identity) and isinstance(ir.conv_dw, nn.Identity)
    assert type(pair[0][1]) is nn.BatchNorm2d and isinstance(pair[0][2], nn.ReLU)
    assert report.inverted_residuals == ["blocks.2.0.conv_pw", "blocks.7.0.conv_pw"]  # the residual blocks
    assert report.key_map()["blocks.2.0.bn1.running_var"] == "blocks.2.0.conv_pw.0.1.running_var"
    assert report.key_map()["blocks.2.0.conv_pw.weight"] == "blocks.2.0.conv_pw.0.0.weight"
    calls = [(n.target, len(n.args)) for n in ir.graph.nodes if n.op == "call_module"]
    assert calls == [("conv_pw", 2)], calls


def test_shared_activation_stays_for_its_other_use():
    model = randomize(hand_written(), seed=7).eval()
    fused, _ = fuse(model)
    shared = fused[1]
    assert isinstance(shared, torch.fx.GraphModule) and isinstance(shared.relu, nn.ReLU)
    assert isinstance(shared.bn1, nn.Identity) and isinstance(shared.dw, JointBlock)


def test_drop_path_with_probability_ends_the_chain_before_the_residual():
    """A DropPath that drops (p > 0) is no identity in training: the add stays outside the block."""
    model = randomize(nn.Sequential(InvertedResidual(8, 8, drop_path_rate=0.2)), seed=8).eval()
    fused, report = fuse(model)
    assert_report(report, {"0.conv_dw": (MID_BN, None)}, {})
    assert isinstance(fused[0].drop_path, nn.Module) and type(fused[0]) is InvertedResidual
    assert_same_function(model, fused, (2, 8, 9, 9))


def test_untraceable_models_fall_back_and_say_so():
    c = 8
    inner = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False),
                          nn.BatchNorm2d(c))
    model = randomize(nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        DataDependent(inner)), seed=9).eval()
    fused, report = fuse(model)
    assert [(f.path, f.how) for f in report.fallbacks] == [
        ("", "matched as an nn.Sequential"), ("6", "its children are traced one by one")]
    assert all("torch.fx cannot trace" in f.reason for f in report.fallbacks)
    assert [c.path for c in report.fused] == ["0", "6.inner.0"] and report.skipped == []
    assert "not traced" in str(report)
    assert_same_function(model, fused, (2, c, 7, 7))


def test_chains_inside_modules_with_hooks_are_fused_and_the_hooks_keep_firing():
    calls = []
    c = 8
    hooked_seq = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False),
                               nn.BatchNorm2d(c))
    hooked_block = FunctionalReluBlock(c)  # its chain needs its own forward replaced: not with a hook on it
    for m in (hooked_seq, hooked_block):
        m.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    model = randomize(nn.Sequential(hooked_seq, hooked_block), seed=13).eval()
    fused, report = fuse(model)
    assert [c.path for c in report.fused] == ["0.0"]
    assert [s.path for s in report.skipped] == ["1.dw"] and "hooks" in report.skipped[0].reason
    assert_same_function(model, fused, (2, c, 9, 9))
    calls.clear()
    with torch.no_grad():
        fused(torch.randn(1, c, 5, 5))
    assert calls == ["Sequential", "FunctionalReluBlock"]


class ReadsNormWeight(nn.Module):
    """forward() uses a chain module's parameter itself: that module must keep its slot."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.pw(self.dw(x))) * self.bn.weight.mean()


def test_modules_registered_twice_or_read_directly_are_skipped():
    c = 8
    aliased = Plain(c)
    aliased.alias = aliased.bn  # the same BatchNorm2d at a second path (called once)
    model = nn.Sequential(aliased, ReadsNormWeight(c))
    _, report = fuse(model)
    assert report.fused == []
    reasons = {s.path: s.reason for s in report.skipped}
    assert "registered at several paths (0.bn, 0.alias)" in reasons["0.dw"]
    assert "forward() reads 1.bn.weight directly" in reasons["1.dw"]


def test_a_chain_issued_by_the_model_itself_replaces_the_model():
    model = randomize(FunctionalReluBlock(8), seed=14).eval()
    fused, report = fuse(model, inplace=True)
    assert fused is not model and isinstance(fused, torch.fx.GraphModule)
    assert [(c.path, c.owner) for c in report.fused] == [("dw", "")]
    assert isinstance(fused.dw, JointBlock) and fused.dw.depthwise is model.dw  # shares the model's modules
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), FunctionalReluBlock.forward(model, x), rtol=1e-4, atol=1e-5)


def test_non_float_dtypes_are_skipped():
    c = 4
    model = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False, dtype=torch.complex64),
                          nn.Conv2d(c, c, 1, bias=False, dtype=torch.complex64), nn.BatchNorm2d(c))
    _, report = fuse(model)
    assert report.fused == [] and [s.path for s in report.skipped] == ["0"]
    assert "non-float dtype torch.complex64" in report.skipped[0].reason


# -- the real libraries, when installed ------------------------------------------------------------------

def assert_matches_relative(model: nn.Module, fused: nn.Module, size: int) -> float:
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    error = 0.0
    with torch.no_grad():
        expected = model(x)
        for _ in range(3):  # later calls replay: LayoutSequential's layouts and members, the prepared calls
            got = fused(x)
            error = max(error, ((got - expected).abs().max() / expected.abs().max()).item())
    assert error <= 1e-5, error
    return error


# model name -> (chains fuse() finds with the op's relu/relu6, chains that also fuse once the op has
# hardswish): measured, see docs/fuse.md. The timm models of issue 14 hold 87 fusable chains in all.
TIMM_CHAINS = {
    "mobilenetv1_100": (13, 0),
    "mobilenetv2_100": (17, 0),
    "mobilenetv3_large_100": (3, 4),
    "efficientnet_b0": (0, 0),  # SE between every SiLU depthwise and its pointwise conv
    "mnasnet_100": (17, 0),
    "fbnetc_100": (21, 0),
    "lcnet_100": (0, 11),
    "mixnet_s": (1, 0),  # the other depthwise convs are MixedConv2d
}
TORCHVISION_CHAINS = {"mobilenet_v2": (17, 0), "mobilenet_v3_small": (2, 0), "mobilenet_v3_large": (3, 4),
                      "mnasnet1_0": (17, 0)}


def expected_chains(counts: Tuple[int, int]) -> int:
    relu_only, with_hardswish = counts
    return relu_only + (with_hardswish if supports("hardswish") else 0)


def test_timm_models_of_the_issue_hold_87_fusable_chains():
    assert sum(a + b for a, b in TIMM_CHAINS.values()) == 87


@pytest.mark.parametrize("name", sorted(TIMM_CHAINS))
def test_real_timm_models(name):
    timm = pytest.importorskip("timm")
    model = randomize(timm.create_model(name, pretrained=False), seed=10).eval()
    fused, report = fuse(model)
    assert len(report.fused) == expected_chains(TIMM_CHAINS[name]), str(report)
    assert report.fallbacks == []
    assert_matches_relative(model, fused, 160)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(to_reference(fused)(x), model(x))


@pytest.mark.parametrize("name", sorted(TORCHVISION_CHAINS))
def test_real_torchvision_models(name):
    models = pytest.importorskip("torchvision.models")
    model = randomize(getattr(models, name)(weights=None), seed=11).eval()
    fused, report = fuse(model)
    assert len(report.fused) == expected_chains(TORCHVISION_CHAINS[name]), str(report)
    assert report.layout_sequentials, str(report)  # the block container chooses its blocks' layouts
    assert_matches_relative(model, fused, 160)
    if name in ("mobilenet_v2", "mnasnet1_0"):  # every member's forward is known: the whole container replays
        container = fused.get_submodule(report.layout_sequentials[0])
        replay = next(iter(container.__dict__["_layout_plans"].values())).replay
        assert replay is not None and all(step is not None for step in replay._steps)
    # Their forwards are a pooled linear classifier after the blocks (MobileNetV3's has two linear
    # layers): body and head run as one native call (nn/classifier_forward.py).
    head = installed(fused)
    assert (head is not None) == (name in ("mobilenet_v2", "mnasnet1_0")), str(report)
    if head is not None:
        x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            want = model(x)
            for _ in range(3):
                got = fused(x)
        assert head.plans()
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    # A checkpoint of the unfused model (torchvision's MNASNet checks the version it carries).
    checkpoint = randomize(getattr(models, name)(weights=None), seed=13).eval()
    fused.load_state_dict(report.map_state_dict(checkpoint.state_dict()))
    assert_matches_relative(checkpoint, fused, 128)


# -- ONNX export of fused models (swapped modules and traced GraphModules alike) --------------------------

@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fused_library_structures_export_to_onnx(exporter):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = randomize(timm_like(), seed=12).eval()
    fused, report = fuse(model)
    assert any(c.owner is not None for c in report.fused) and any(c.owner is None for c in report.fused)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    if exporter == "dynamo":
        data = torch.onnx.export(fused, (x,), dynamo=True, input_names=["x"], verbose=False).model_proto
        data = data.SerializeToString()
    else:
        buffer = io.BytesIO()
        torch.onnx.export(fused, (x,), buffer, dynamo=False, input_names=["x"])
        data = buffer.getvalue()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-5, error
