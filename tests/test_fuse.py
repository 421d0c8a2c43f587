"""lwkernels.nn.fuse: finds the depthwise-separable chains of models written the way model libraries
write them, replaces them by JointBlocks sharing their parameters, and changes nothing else."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import lwkernels
from lwkernels import ConvBNAct, JointBlock, JointBlockReference
from lwkernels.nn.fuse import FuseReport, fuse, to_reference
from lwkernels.nn.layout_sequential import LayoutSequential
from lwkernels.models import LightweightNet
from lwkernels.ops.activation import ACTIVATIONS


# -- model-library-style test models ---------------------------------------------------------------

class ConvNormActivation(nn.Sequential):
    """torchvision's Conv2dNormActivation pattern: a Sequential subclass with only an __init__."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, activation=nn.ReLU6, dilation=1):
        padding = (kernel_size - 1) // 2 * dilation
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNet-V2's block: [expand 1x1] -> depthwise ConvNormActivation -> linear 1x1 + BN, and a
    residual add in forward."""

    def __init__(self, cin, cout, stride, expand_ratio, dilation=1):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(cin, hidden, kernel_size=1))
        layers += [ConvNormActivation(hidden, hidden, stride=stride, groups=hidden, dilation=dilation),
                   nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Like(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        settings = [(1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2)]  # t, c, n, s (small)
        features = [ConvNormActivation(3, 8, stride=2)]
        cin = 8
        for t, c, n, s in settings:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t, dilation=1 + i))
                cin = c
        features.append(ConvNormActivation(cin, 32, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def conv_bn(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def conv_dw(cin, cout, stride):
    """The common MobileNet-V1 reimplementation: one flat Sequential per block."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


def conv_dw_split(cin, cout, stride):
    """timm-style: the depthwise and the pointwise halves in two nested Sequentials."""
    return nn.Sequential(
        ConvNormActivation(cin, cin, stride=stride, groups=cin, activation=nn.ReLU),
        ConvNormActivation(cin, cout, kernel_size=1, activation=nn.ReLU),
    )


class MobileNetV1Like(nn.Module):
    def __init__(self, num_classes=7):
        super().__init__()
        self.model = nn.Sequential(conv_bn(3, 8, 2), conv_dw(8, 16, 1), conv_dw_split(16, 24, 2), conv_dw(24, 24, 1),
                                   nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        return self.fc(self.model(x).flatten(1))


class ResidualDSBlock(nn.Module):
    """A ResNet-style block: a Sequential with a (biased) dw-separable chain, the add in forward."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=2, dilation=2, groups=c),  # bias=True
                                  nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + x)


class Plain(nn.Module):
    """A chain wired in forward (not in a Sequential): found by tracing, fused by swapping modules."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.pw(self.dw(x)))


class WeirdConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def dw(c, **kw):
    return nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False, **kw)


def pw(cin, cout, bias=False):
    return nn.Conv2d(cin, cout, 1, bias=bias)


def near_miss_model():
    """Sequentials of which some chains fuse and some are near-misses (index -> expected reason)."""
    c = 8
    hooked_bn = nn.BatchNorm2d(c)
    hooked_bn.register_forward_hook(lambda m, i, o: None)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(c), pw(c, c),
                      nn.BatchNorm2d(c), nn.ReLU()),                                           # 0 grouped
        nn.Sequential(dw(c), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)),  # 1 3x3
        nn.Sequential(dw(c), nn.Dropout(0.1), pw(c, c), nn.BatchNorm2d(c)),                      # 2 dropout
        nn.Sequential(dw(c), nn.BatchNorm2d(c), nn.ReLU(), nn.Hardswish(), pw(c, c), nn.BatchNorm2d(c)),  # 3 extra op
        nn.Sequential(dw(c), pw(c, c), nn.ReLU()),                                               # 4 no BN
        nn.Sequential(WeirdConv(c, c, 3, padding=1, groups=c), pw(c, c), nn.BatchNorm2d(c)),     # 5 subclass
        nn.Sequential(dw(c), pw(c, c), hooked_bn),                                               # 6 hooks
        nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, padding_mode="reflect"), pw(c, c),
                      nn.BatchNorm2d(c)),                                                        # 7 reflect
        nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, groups=c), pw(2 * c, c), nn.BatchNorm2d(c)),  # 8 multiplier
        # fusable ones
        nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=True), nn.BatchNorm2d(c), nn.ReLU6(),
                      pw(c, c, bias=True), nn.BatchNorm2d(c), nn.Hardswish()),                   # 9 biases, no act
        nn.Sequential(nn.Conv2d(c, c, 5, stride=2, padding=4, dilation=2, groups=c), nn.Identity(),
                      pw(c, 12), nn.BatchNorm2d(12), nn.ReLU()),                                 # 10 k5 s2 d2
        ResidualDSBlock(12),                                                                     # 11 residual
        Plain(12),                                                                               # 12 forward-wired
        nn.Sequential(dw(12), nn.ReLU6(), pw(12, 8), nn.BatchNorm2d(8), nn.ReLU()),             # 13 mid act, no mid BN
    )


def hardswish_supported():
    return "hardswish" in ACTIVATIONS


NEAR_MISS_REASONS = {
    "0.0": "grouped conv",
    "1.0": "is not a 1x1 pointwise conv",
    "2.0": "followed by Dropout",
    "3.0": "followed by Hardswish",
    "4.0": "not a BatchNorm2d",
    "5.0": "overrides Conv2d.forward",
    "6.0": "hooks",
    "7.0": "zero padding",
    "8.0": "channel multiplier",
}


# -- helpers -------------------------------------------------------------------------------------------

def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def n_joint_blocks(model):
    return sum(isinstance(m, JointBlock) for m in model.modules())


def module_paths(model):
    return {name: m for name, m in model.named_modules()}


def assert_nothing_else_changed(original, fused, report: FuseReport):
    """Keys outside fused chains keep their names and values; fused keys moved per key_map."""
    before, after = original.state_dict(), fused.state_dict()
    key_map = report.key_map()
    assert set(after) == {key_map.get(k, k) for k in before}
    for k, v in before.items():
        assert torch.equal(after[key_map.get(k, k)], v), k
    # Every module outside a fused chain is still at its path (same type; same object when inplace);
    # a module replaced by its traced GraphModule keeps its class name.
    consumed = {p for chain in report.fused for p in chain.modules.values()}
    consumed |= set(report.conv_bn_act_moves)  # siblings moved into a ConvBNAct (slots: ConvBNAct, Identity)
    consumed |= set(report.inverted_residual_norms)  # norms with an activation, now a plain twin
    owners = {chain.owner for chain in report.fused if chain.owner is not None}
    fused_paths = module_paths(fused)

    def moved(path):  # modules inside an expand paired into an InvertedResidual moved one level down
        for old, new in report.inverted_residual_moves.items():
            if path.startswith(old + "."):
                return new + path[len(old):]
        return path

    for path, m in module_paths(original).items():
        if path and path not in consumed and not any(path.startswith(c + ".") for c in consumed):
            if path not in report.inverted_residuals:
                path = moved(path)
            if path in owners:
                assert isinstance(fused_paths[path], torch.fx.GraphModule), path
                assert type(fused_paths[path]).__name__ == type(m).__name__, path
            elif path in report.inverted_residuals:  # an expand ConvBNAct paired with its JointBlock
                assert isinstance(fused_paths[path], lwkernels.InvertedResidual), path
                assert isinstance(fused_paths[path][0], ConvBNAct), path
            elif path in report.conv_bn_acts:  # an image stem, now the native ConvBNAct
                assert isinstance(fused_paths[path], ConvBNAct), path
            elif path in report.layout_sequentials:  # the same container, choosing its blocks' layouts
                assert type(m) is nn.Sequential and type(fused_paths[path]) is LayoutSequential, path
            else:
                assert type(fused_paths[path]) is type(m), path


# -- tests -----------------------------------------------------------------------------------------------

def test_mobilenet_v1_library_style_fuses_every_block():
    model = randomize(MobileNetV1Like()).eval()
    fused, report = fuse(model)
    assert [c.path for c in report.fused] == ["model.1.0", "model.2.0.0", "model.3.0"]
    assert report.skipped == []
    assert report.fused[1].modules == {"depthwise": "model.2.0.0", "mid_bn": "model.2.0.1", "mid_act": "model.2.0.2",
                                       "pointwise": "model.2.1.0", "bn": "model.2.1.1", "act": "model.2.1.2"}
    blocks = [m for m in fused.modules() if isinstance(m, JointBlock)]
    assert len(blocks) == 3 and all(b.mid_bn is not None for b in blocks)
    assert n_joint_blocks(model) == 0  # the original is untouched
    assert_nothing_else_changed(model, fused, report)
    x = torch.randn(2, 3, 17, 19)
    with torch.no_grad():
        torch.testing.assert_close(to_reference(fused)(x), model(x), rtol=0, atol=0)  # same function, unfused
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [MobileNetV1Like, MobileNetV2Like], ids=["v1", "v2"])
def test_fused_model_is_freed_without_the_garbage_collector(make):
    """fuse() traces with torch.fx, whose tracers are left in a reference cycle; they must not keep
    the model (or the fused one, holding its kernels' buffers once called) alive after the last
    reference is dropped. (A fused model that is itself a traced GraphModule is in torch.fx's own
    GraphModule <-> Graph cycle; these two are not.)"""
    model = randomize(make()).eval()
    fused, report = fuse(model)
    assert not isinstance(fused, torch.fx.GraphModule)
    with torch.no_grad():
        for _ in range(3):  # (prepared native plans included)
            fused(torch.randn(1, 3, 32, 32))
    refs = [weakref.ref(model), weakref.ref(fused)]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        del model, fused, report
        assert [r() is None for r in refs] == [True, True]
    finally:
        if was_enabled:
            gc.enable()


class _VersionChecked(MobileNetV2Like):
    """Checks its version while loading a state_dict, as torchvision's MNASNet does."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2, got {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_a_checkpoint_of_the_unfused_model_loads_with_map_state_dict():
    """FuseReport.map_state_dict renames a checkpoint's keys for the fused model and moves the
    per-module versions (state_dict's _metadata) with them: a plain dict of renamed keys drops them,
    which a model that checks its version refuses."""
    torch.manual_seed(0)
    model = randomize(_VersionChecked()).eval()
    fused, report = fuse(model)
    assert report.inverted_residuals and report.key_map()
    checkpoint = randomize(_VersionChecked(), seed=3).eval()
    sd = checkpoint.state_dict()
    with pytest.raises(ValueError, match="version should be 2"):
        fused.load_state_dict({report.key_map().get(k, k): v for k, v in sd.items()})
    mapped = report.map_state_dict(sd)
    assert list(mapped) == [report.key_map().get(k, k) for k in sd]
    old, new = next((k, v) for k, v in report.key_map().items() if k.endswith(".running_var") and k != v)
    assert mapped._metadata[new.rpartition(".")[0]] == sd._metadata[old.rpartition(".")[0]]
    fused.load_state_dict(mapped)
    x = torch.randn(2, 3, 33, 35)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(fused(x), checkpoint(x), rtol=1e-4, atol=1e-5)
    assert report.map_state_dict(dict(sd)) == dict(mapped)  # (a dict without _metadata maps its keys alone)


def test_mobilenet_v2_inverted_residuals():
    model = randomize(MobileNetV2Like(), seed=1).eval()
    fused, report = fuse(model)
    # The depthwise ConvNormActivation + linear 1x1 + BN of each of the 5 inverted residuals; where the
    # block adds its input (stride 1, same width), that add in forward() is the op's residual and the
    # block becomes a traced GraphModule.
    assert len(report.fused) == 5 and report.skipped == []
    with_residual = {f"features.{i}" for i, b in enumerate(model.features)
                     if isinstance(b, InvertedResidual) and b.use_res_connect}
    assert with_residual == {"features.1", "features.3", "features.5"}
    for chain in report.fused:
        owner = chain.path.split(".conv.")[0]
        linear_bottleneck = {"depthwise", "mid_bn", "mid_act", "pointwise", "bn"}
        if owner in with_residual:
            assert set(chain.modules) == linear_bottleneck | {"add"} and chain.owner == owner
        else:
            assert set(chain.modules) == linear_bottleneck and chain.owner is None
    # The expand conv (1x1 -> BN -> ReLU6) is a ConvBNAct holding (copies of) the same modules, paired
    # with the JointBlock it feeds into an InvertedResidual in its slot (the block's slot: Identity);
    # inside a traced owner (features.3) the graph calls the InvertedResidual once, residual included.
    assert report.conv_bn_acts == ["features.0", "features.2.conv.0", "features.3.conv.0", "features.4.conv.0",
                                   "features.5.conv.0", "features.6"]
    assert report.inverted_residuals == ["features.2.conv.0", "features.3.conv.0", "features.4.conv.0",
                                         "features.5.conv.0"]
    pair = fused.features[2].conv[0]
    assert isinstance(pair, lwkernels.InvertedResidual) and isinstance(pair[0], ConvBNAct) and not pair.skip
    assert isinstance(pair[1], JointBlock) and pair[1].act.__class__ is nn.Identity
    assert isinstance(fused.features[2].conv[1][0], nn.Identity)
    calls = [(n.target, len(n.args)) for n in fused.features[3].graph.nodes if n.op == "call_module"]
    assert calls == [("conv.0", 2)]  # (x, residual x)
    assert fused.features[2].conv[0][0][0] is not model.features[2].conv[0][0]  # a deep copy...
    assert_nothing_else_changed(model, fused, report)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
        fused64, model64 = fused.double(), model.double()
        torch.testing.assert_close(fused64(x.double()), model64(x.double()), rtol=1e-10, atol=1e-12)


def test_fuse_inside_inference_mode_copies_into_ordinary_tensors():
    # Tensors made inside inference mode have no version counter, so a copy made there could never
    # replay its prepared calls; fuse() copies outside it and the fused model runs its fast path.
    model = randomize(MobileNetV2Like(), seed=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        fused, report = fuse(model)
        assert report.inverted_residuals
        assert not any(p.is_inference() for p in fused.parameters())
        assert not any(b.is_inference() for b in fused.buffers())
        for _ in range(2):
            y = fused(x)
        pair = fused.features[2].conv[0]
        assert pair.__dict__.get("_prepared") is not None  # replayed, not rebuilt every call
        torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-5)


def test_near_misses_are_reported_and_left_alone():
    model = randomize(near_miss_model(), seed=2).eval()
    original = copy.deepcopy(model)
    fused, report = fuse(model, inplace=True)
    assert fused is model
    # Forward-wired chains are found now: 11's add (+ relu) is the op's residual, 12 swaps modules.
    assert [c.path for c in report.fused] == ["9.0", "10.0", "11.body.0", "12.dw", "13.0"]
    assert set(report.fused[2].modules) == {"depthwise", "pointwise", "bn", "add", "act"}
    assert report.fused[2].owner == "11" and report.fused[3].owner is None
    assert set(report.fused[4].modules) == {"depthwise", "mid_act", "pointwise", "bn", "act"}
    skipped = {s.path: s.reason for s in report.skipped}
    assert set(skipped) == set(NEAR_MISS_REASONS), report
    for path, fragment in NEAR_MISS_REASONS.items():
        assert fragment in skipped[path], (path, skipped[path])
    if not hardswish_supported():  # the op's output activation ends the chain: Hardswish stays a module
        assert isinstance(model[9][5], nn.Hardswish) and model[9][0].act.__class__ is nn.Identity
    assert isinstance(model[12].dw, JointBlock) and isinstance(model[12].pw, nn.Identity)
    # Skipped chains: same module objects in place.
    for i in range(9):
        assert not any(isinstance(m, JointBlock) for m in model[i].modules())
    assert_nothing_else_changed(original, model, report)
    x = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        expected = original(x)
        torch.testing.assert_close(to_reference(model)(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_inplace_shares_parameters_and_keeps_other_modules():
    model = randomize(MobileNetV2Like(), seed=3)
    before = module_paths(model)
    params_before = {id(p) for p in model.parameters()}
    _, report = fuse(model, inplace=True)
    after = module_paths(model)
    consumed = {p for chain in report.fused for p in chain.modules.values()}
    owners = {chain.owner for chain in report.fused if chain.owner is not None}
    assert owners == {"features.1", "features.3", "features.5"}  # the blocks with a residual add
    for path, m in before.items():
        if path in owners:  # replaced by a GraphModule holding the very same children
            assert isinstance(after[path], torch.fx.GraphModule)
            assert dict(after[path].named_children()).keys() == dict(m.named_children()).keys()
        elif path in report.conv_bn_acts:  # a ConvBNAct holding the very same modules
            held = after[path][0] if path in report.inverted_residuals else after[path]  # (paired)
            assert all(a is b for a, b in zip(held, m)), path
        elif path not in consumed:
            for old, new in report.inverted_residual_moves.items():  # (inside a paired expand)
                if path.startswith(old + "."):
                    path = new + path[len(old):]
            assert after[path] is m, path  # identical objects
    assert report.conv_bn_acts == ["features.0", "features.2.conv.0", "features.3.conv.0", "features.4.conv.0",
                                   "features.5.conv.0", "features.6"]
    assert {id(p) for p in model.parameters()} == params_before  # shared, not copied
    chain = report.fused[0]
    block = after[chain.path]
    assert block.depthwise is before[chain.modules["depthwise"]] and block.bn is before[chain.modules["bn"]]
    for role, path in list(chain.modules.items())[1:]:
        if role != "add":  # the add is an op of the owner's forward, not a module
            assert isinstance(after[path], nn.Identity), (role, path)


def test_train_mode_matches_and_gradients_flow():
    torch.manual_seed(0)
    model = MobileNetV1Like()
    fused, _ = fuse(model)
    x = torch.randn(4, 3, 16, 16)
    y_ref, y = model(x), fused(x)  # batch statistics: the reference composition inside JointBlock
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    grads = dict(model.named_parameters())
    key_map = fuse(model)[1].key_map()
    old_name = {new: old for old, new in key_map.items()}
    assert len(list(fused.parameters())) == len(grads)
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[old_name.get(name, name)].grad, rtol=1e-5, atol=1e-6)
    # Running statistics were updated identically.
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key_map.get(k, k)], v)


def test_refuse_and_reference_roundtrip():
    model = LightweightNet(width_mult=0.25).eval()
    again, report = fuse(model)
    assert report.fused == [] and n_joint_blocks(again) == 9  # already fused: nothing to do
    ref = to_reference(model)
    assert n_joint_blocks(ref) == 0 and sum(type(m) is JointBlockReference for m in ref.modules()) == 9
    assert not ref.training and not ref.features[0].training
    back, report = fuse(ref)
    assert n_joint_blocks(back) == 9 and len(report.fused) == 9
    assert back.state_dict().keys() == model.state_dict().keys()
    single, _ = fuse(JointBlockReference(dw(4), pw(4, 4), nn.BatchNorm2d(4), nn.ReLU()))
    assert isinstance(single, JointBlock)


def test_fuse_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        fuse(lambda x: x)


# -- conv -> BN -> act containers ------------------------------------------------------------------------------


class _Stem(nn.Sequential):
    """Like torchvision's Conv2dNormActivation: an nn.Sequential subclass that keeps forward."""


class _OwnForward(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2


def _stem_model():
    return nn.Sequential(
        _Stem(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()),
        _OwnForward(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),  # 1x1: converted too
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),  # 8 channels: PyTorch
    )


def test_fuse_turns_stems_and_1x1_conv_bn_act_into_convbnact():
    model = randomize(_stem_model(), 3).eval()
    fused, report = lwkernels.fuse(model)
    assert report.conv_bn_acts == ["0", "2"]
    assert isinstance(fused[0], ConvBNAct) and not isinstance(fused[1], ConvBNAct)
    assert isinstance(fused[2], ConvBNAct) and type(fused[3]) is nn.Sequential
    assert list(fused.state_dict()) == list(model.state_dict())
    assert "ConvBNAct" in str(report)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    back = lwkernels.to_reference(fused)
    assert not any(isinstance(m, ConvBNAct) for m in back.modules())


class _FlatResidual(nn.Module):
    """MNASNet's block: one flat Sequential (expand conv, BN, ReLU, dw conv, BN, ReLU, project, BN)
    and the residual add in forward()."""

    def __init__(self, c: int, expand: int = 3) -> None:
        super().__init__()
        mid = c * expand
        self.layers = nn.Sequential(
            nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return self.layers(x) + x


def test_fuse_converts_flat_conv_bn_act_runs_in_sequentials_and_traced_graphs():
    model = randomize(nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),   # flat stem run
        _FlatResidual(8),                                                                 # traced owner
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),                  # flat 1x1 run
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),       # 16 channels: PyTorch
    ), seed=4).eval()
    original = copy.deepcopy(model)
    fused, report = fuse(model)
    assert report.conv_bn_acts == ["0", "3.layers.0", "4"], report.conv_bn_acts
    assert isinstance(fused[0], ConvBNAct) and isinstance(fused[1], nn.Identity) and isinstance(fused[2], nn.Identity)
    # In the traced owner the expand ConvBNAct and the JointBlock after it are one InvertedResidual
    # (expand at .0, block at .1) in the expand's slot, called once with the residual.
    assert report.inverted_residuals == ["3.layers.0"]
    assert isinstance(fused[3].layers[0], lwkernels.InvertedResidual) and isinstance(fused[3].layers[1], nn.Identity)
    assert isinstance(fused[3].layers[0][0], ConvBNAct) and isinstance(fused[3].layers[0][1], JointBlock)
    assert type(fused[7]) is nn.Conv2d
    calls = [(n.target, len(n.args)) for n in fused[3].graph.nodes if n.op == "call_module"]
    assert calls == [("layers.0", 2)]
    assert report.conv_bn_act_moves["1"] == "0.1" and report.conv_bn_act_moves["3.layers.2"] == "3.layers.0.0.2"
    assert_nothing_else_changed(original, fused, report)
    # The original's state_dict loads into the fused model through key_map.
    key_map = report.key_map()
    reloaded = fuse(copy.deepcopy(original))[0]
    reloaded.load_state_dict({key_map.get(k, k): v for k, v in original.state_dict().items()})
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        expected = original(x)
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reloaded(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(to_reference(fused)(x), expected, rtol=0, atol=0)
