"""The model zoo: the papers' facts each model claims to reproduce, fused == reference, training."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lwkernels import JointBlock, JointBlockReference
from lwkernels.models import (DSRNet, LightweightNet, MobileNetV1, MultiScaleNet, MultiScaleUnit, build_model,
                              count_parameters, to_reference)
from lwkernels.models.dsrnet import DSRBlock
from lwkernels.models.shapes import LIGHTWEIGHTNET_CONFIG, lightweightnet_blocks


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def lightweightnet_parameters(width_mult: float, num_classes: int) -> int:
    """By hand from the block table: depthwise 3x3 + pointwise + BN (weight, bias) per block, then FC."""
    total, c_prev = 0, 3
    for _, c_out, _ in LIGHTWEIGHTNET_CONFIG:
        c_out = int(c_out * width_mult)
        total += 9 * c_prev + c_prev * c_out + 2 * c_out
        c_prev = c_out
    return total + c_prev * num_classes + num_classes


@pytest.mark.parametrize("width_mult, expected", [(1.0, "3.11"), (0.75, "1.76")])
def test_lightweightnet_parameter_count(width_mult, expected):
    n = count_parameters(LightweightNet(num_classes=10, width_mult=width_mult))
    print(f"LightweightNet alpha={width_mult}, 10 classes: {n:,} parameters ({n / 1e6:.2f} M)")
    assert n == lightweightnet_parameters(width_mult, 10)
    assert f"{n / 1e6:.2f}" == expected  # the paper: 3.1 M at alpha = 1


def test_other_parameter_counts():
    counts = {
        "MobileNetV1 1.0, 1000 classes": (count_parameters(MobileNetV1()), 4_231_976),  # the paper's 4.2 M
        "MultiScaleNet concat, 10 classes": (count_parameters(MultiScaleNet("concat")), 150_922),
        "MultiScaleNet add, 10 classes": (count_parameters(MultiScaleNet("add")), 194_826),
        "DSRNet, 10 classes": (count_parameters(DSRNet()), 12_237_706),
    }
    for name, (n, expected) in counts.items():
        print(f"{name}: {n:,} parameters")
        assert n == expected, name


def test_lightweightnet_layers_follow_the_paper():
    model = LightweightNet(width_mult=0.5, dilation=3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1]
    pointwise = [c for c in convs if c.kernel_size == (1, 1)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(depthwise) == 9 and len(pointwise) == 9 and len(bns) == 9 and len(convs) == 18
    assert sum(isinstance(m, (nn.AdaptiveAvgPool2d, nn.Linear)) for m in model.modules()) == 2  # 29 layers
    assert all(c.dilation == (3, 3) and c.padding == (3, 3) and c.kernel_size == (3, 3) for c in depthwise)
    blocks = list(model.features)
    assert all(isinstance(b, JointBlock) and b.mid_bn is None for b in blocks)
    assert [(b.depthwise.in_channels, b.pointwise.out_channels, b.depthwise.stride[0]) for b in blocks] == [
        (3 if i == 0 else int(ci * 0.5), int(co * 0.5), s) for i, (ci, co, s) in enumerate(LIGHTWEIGHTNET_CONFIG)]
    assert LightweightNet(dilation=1).features[4].depthwise.dilation == (1, 1)


@pytest.mark.parametrize("size", [224, 192, 160, 32])
def test_lightweightnet_any_resolution(size):
    model = LightweightNet(num_classes=10, width_mult=0.25)
    x = torch.randn(2, 3, size, size)  # batch 2: BN in training mode needs 2 values per channel at 1x1
    feats = model.features(x)
    final = lightweightnet_blocks(size)[-1].out_size
    assert feats.shape == (2, int(1024 * 0.25), final, final)
    assert final == {224: 7, 192: 6, 160: 5, 32: 1}[size]
    assert model(x).shape == (2, 10)


def test_models_build_by_name():
    m = build_model("LightweightNet", num_classes=4, width_mult=0.25, dilation=2, method="add")  # method ignored
    assert isinstance(m, LightweightNet) and m.classifier.out_features == 4
    assert m.features[0].depthwise.dilation == (2, 2)
    assert isinstance(build_model("multiscalenet", method="add", width_mult=0.25), MultiScaleNet)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")


SMALL_MODELS = {
    "lightweightnet": lambda: LightweightNet(num_classes=10, width_mult=0.25),
    "multiscale-concat": lambda: MultiScaleNet("concat", width_mult=0.25),
    "multiscale-add": lambda: MultiScaleNet("add", width_mult=0.25),
    "dsrnet": lambda: DSRNet(width_mult=0.125, layers=(1, 2, 3, 1)),
    "mobilenetv1": lambda: MobileNetV1(width_mult=0.25, num_classes=10),
}


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_fused_eval_matches_reference(name):
    torch.manual_seed(0)
    model = randomize_bn(SMALL_MODELS[name]()).eval()
    reference = to_reference(model)
    assert not any(isinstance(m, JointBlock) for m in reference.modules())
    assert any(isinstance(m, JointBlockReference) for m in reference.modules())
    assert model.to_reference().state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
        x64 = x.double()
        torch.testing.assert_close(model.double()(x64), reference.double()(x64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_training_step(name):
    torch.manual_seed(0)
    model = SMALL_MODELS[name]().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    model.eval()
    with torch.no_grad():  # the fused inference path after training
        torch.testing.assert_close(model(x), to_reference(model)(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["concat", "add"])
def test_multiscale_unit_semantics(method):
    """The unit computes relu(merge(branch3, branch5) + shortcut), written out with plain modules."""
    torch.manual_seed(1)
    unit = randomize_bn(MultiScaleUnit(6, 10, stride=2, method=method)).eval()
    x = torch.randn(2, 6, 9, 9)

    def separable(block, t, act=True):
        ref = block.to_reference()
        y = ref.bn(ref.pointwise(ref.depthwise(t)))
        return torch.relu(y) if act else y

    with torch.no_grad():
        b3 = separable(unit.branch3, x, act=False)
        b5 = separable(unit.branch5[1], separable(unit.branch5[0], x), act=False)
        merged = torch.cat([b3, b5], 1) if method == "concat" else b3 + b5
        expected = torch.relu(merged + unit.shortcut(x))
        torch.testing.assert_close(unit(x), expected, rtol=1e-4, atol=1e-5)
    assert unit(x).shape == (2, 10, 5, 5)
    with pytest.raises(ValueError, match="method"):
        MultiScaleUnit(4, 4, method="mul")


def test_multiscale_network_layout():
    model = MultiScaleNet("concat")
    assert len(model.units) == 3 and sum(isinstance(m, JointBlock) for m in model.modules()) == 9
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 2
    two_units = MultiScaleNet("add", widths=(32, 64), strides=(1, 2), width_mult=0.5)
    assert two_units(torch.randn(1, 3, 28, 28)).shape == (1, 10)  # MNIST-sized, 2 units


def test_dsrnet_layout_and_block():
    model = DSRNet(num_classes=100, width_mult=0.125)
    stem = model.stem[0]
    assert (stem.kernel_size, stem.stride, stem.dilation) == ((7, 7), (2, 2), (3, 3))
    assert [len(s) for s in model.stages] == [3, 4, 6, 3]
    dilations = [[b.separable.depthwise.dilation[0] for b in s] for s in model.stages]
    assert dilations == [[1, 2, 3], [2, 2, 3, 1], [2, 2, 3, 1, 2, 3], [2, 2, 3]]
    assert [s[-1].separable.pointwise.out_channels for s in model.stages] == [32, 64, 128, 256]  # 4 x width
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)

    torch.manual_seed(2)
    block = randomize_bn(DSRBlock(16, 8, stride=2, dilation=2)).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        ref = block.separable.to_reference()
        expected = torch.relu(ref.bn(ref.pointwise(ref.depthwise(block.reduce(x)))) + block.shortcut(x))
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_mobilenet_v1_blocks_have_mid_norm():
    model = MobileNetV1(width_mult=0.5)
    blocks = [m for m in model.modules() if isinstance(m, JointBlock)]
    assert len(blocks) == 13 and all(b.mid_bn is not None and isinstance(b.mid_act, nn.ReLU) for b in blocks)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_model_bench_rows():
    from lwkernels.bench.models import format_rows, run_model_bench

    rows = run_model_bench("lightweightnet", batch=1, input_size=32, width_mult=0.25, repeats=2, warmup=1,
                           threads=1, train=True)
    assert [(r["mode"], r["provider"]) for r in rows] == [
        ("inference", "reference"), ("inference", "lwkernels"), ("train", "reference"), ("train", "lwkernels")]
    assert all(r["median_ms"] > 0 and r["repeats"] >= 2 and r["threads"] == 1 for r in rows)
    assert rows[0]["speedup"] == 1.0 and rows[2]["batch"] == 2  # training needs >= 2 values per BN channel
    assert rows[1]["max_rel_error"] < 1e-4
    assert "lwkernels" in format_rows(rows)
