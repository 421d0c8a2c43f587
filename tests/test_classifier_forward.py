"""fuse() on a model whose forward is a classifier head after one body (torchvision's MobileNetV2 and
MNASNet): the model gets a ClassifierForward (nn/classifier_forward.py) that runs the head fused, and
body + head as one native call once the body replays (cpu/prepared_classifier.py). Outputs stay those
of the original model to rounding; anything the fused head does not cover runs the class's forward,
exactly; forwards of any other shape are left alone."""
from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
from torch import nn

import lwkernels
from helpers import assert_freed_by_refcount, randomize_
from lwkernels import fuse, to_reference
from lwkernels.cpu.prepared_classifier import PreparedClassifier
from lwkernels.nn.classifier_forward import installed

CL = torch.channels_last


def _ir(cin, e, cout, stride, k=3):
    return nn.Sequential(
        nn.Conv2d(cin, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
        nn.Conv2d(e, e, k, stride, k // 2, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
        nn.Conv2d(e, cout, 1, bias=False), nn.BatchNorm2d(cout))


class _Residual(nn.Module):
    def __init__(self, c: int, e: int) -> None:
        super().__init__()
        self.conv = _ir(c, e, c, 1)

    def forward(self, x):
        return x + self.conv(x)


class TinyV2(nn.Module):
    """torchvision's MobileNetV2 forward: functional pooling, flatten, Sequential(Dropout, Linear)."""

    def __init__(self, classes: int = 7) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()),
            _ir(16, 48, 24, 2), _Residual(24, 72), _ir(24, 72, 32, 2, 5), _Residual(32, 96),
            nn.Sequential(nn.Conv2d(32, 40, 1, bias=False), nn.BatchNorm2d(40), nn.ReLU6()))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(40, classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class TinyMnas(TinyV2):
    """torchvision's MNASNet forward: a mean over H and W."""

    def forward(self, x):
        x = self.features(x)
        x = x.mean([2, 3])
        return self.classifier(x)


class TinyPoolModule(TinyV2):
    """An nn.AdaptiveAvgPool2d child and a bare nn.Linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(40, 5)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _model(cls=TinyV2, dtype=torch.float32, seed=3):
    model = randomize_(cls(), seed=seed).to(dtype).eval()
    with torch.no_grad():
        for p in model.modules():
            if isinstance(p, nn.Linear):
                g = torch.Generator().manual_seed(seed + 1)
                p.weight.copy_(torch.randn(p.weight.shape, generator=g, dtype=dtype))
                p.bias.copy_(torch.randn(p.bias.shape, generator=g, dtype=dtype))
    return model


def _input(batch=2, dtype=torch.float32, channels_last=False, seed=7, size=48):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.contiguous(memory_format=CL) if channels_last else x


def _close(got, want, dtype=torch.float32):
    torch.testing.assert_close(got, want, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                               atol=1e-5 if dtype == torch.float32 else 1e-10)


def _class_forward(model, x):
    """What the model's own class computes (the module path, no fused head)."""
    return type(model).forward(model, x)


def _warm(model, x, calls=3):
    with torch.no_grad():
        for _ in range(calls):
            y = model(x)
    return y


@pytest.mark.parametrize("cls,pool", [(TinyV2, "adaptive_avg_pool2d"), (TinyMnas, "mean"),
                                      (TinyPoolModule, "avgpool")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_head_runs_fused_with_the_original_outputs(cls, pool, dtype, channels_last, batch, monkeypatch):
    original = _model(cls, dtype)
    model, report = fuse(original)
    forward = installed(model)
    assert forward is not None and forward.pattern.pool == pool and forward.pattern.body == "features"
    assert report.classifier_head == forward.pattern and "ClassifierForward" in str(report)
    x = _input(batch, dtype, channels_last)
    with torch.no_grad():
        want = original(x)
        first = model(x)  # (body as modules, fused head)
        _close(first, want, dtype)
        _warm(model, x)
        (plan,) = forward.plans()
        runs = []
        real_run = PreparedClassifier.run
        monkeypatch.setattr(PreparedClassifier, "run", lambda self, x: runs.append(1) or real_run(self, x))
        got = model(x)
        other = _input(batch, dtype, channels_last, seed=11)
        got_other = model(other)
    assert len(runs) == 2, "the warm calls must be one native call each"
    assert plan.native.step_labels()[-1].startswith("PreparedHead")
    assert got.shape == want.shape and got.is_contiguous()
    _close(got, want, dtype)
    with torch.no_grad():
        _close(got_other, original(other), dtype)


def test_every_warm_call_gives_the_same_values():
    model, _ = fuse(_model())
    x = _input()
    with torch.no_grad():
        y = _warm(model, x, 4)
        assert torch.equal(model(x), y)


def _no_head(model):
    return installed(model) is None and "forward" not in model.__dict__


class ExtraOp(TinyV2):
    def forward(self, x):
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(x * 2)


class KeepDim(TinyV2):
    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x).mean([2, 3], keepdim=True), 1))


class PoolToTwo(TinyV2):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(160, 7))

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 2), 1))


class TwoLinears(TinyV2):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(40, 20), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(20, 7))


class ReusedFeatures(TinyV2):
    def forward(self, x):
        f = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1)) + f.sum()


class MaxPool(TinyV2):
    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_max_pool2d(self.features(x), 1), 1))


@pytest.mark.parametrize("cls", [ExtraOp, KeepDim, PoolToTwo, TwoLinears, ReusedFeatures, MaxPool])
def test_other_forwards_are_left_alone(cls):
    original = _model(cls)
    model, report = fuse(original)
    assert _no_head(model) and report.classifier_head is None
    x = _input()
    with torch.no_grad():
        _close(_warm(model, x), original(x))


def test_a_body_without_fused_blocks_is_left_alone():
    class NoBlocks(TinyV2):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 40, 3, 2, 1), nn.ReLU())

    model, _ = fuse(_model(NoBlocks))
    assert _no_head(model)


def _equal_to_class_forward(model, x):
    got = model(x)
    assert torch.equal(got, _class_forward(model, x))
    return got


@pytest.mark.parametrize("how", ["grad", "train", "classifier_hook", "linear_hook", "dropout_train", "kwargs"])
def test_what_the_fused_head_does_not_cover_runs_the_class_forward(how):
    model, _ = fuse(_model())
    x = _input()
    _warm(model, x)
    hits = []
    if how == "classifier_hook":
        model.classifier.register_forward_hook(lambda *a: hits.append(1))
    elif how == "linear_hook":
        model.classifier[1].register_forward_pre_hook(lambda *a: hits.append(1))
    elif how == "dropout_train":
        model.classifier[0].p = 0.0
        model.classifier[0].train()
    if how == "grad":
        got = model(x)
        assert got.requires_grad
        torch.testing.assert_close(got, _class_forward(model, x))
        return
    if how == "train":
        model.train()
        torch.manual_seed(0)
        got = model(x)
        torch.manual_seed(0)
        want = _class_forward(model, x)
        torch.testing.assert_close(got, want)
        return
    with torch.no_grad():
        if how == "kwargs":  # (x by name is the same call)
            assert torch.equal(model(x=x), model(x))
            assert torch.equal(model(x=x), _warm(copy.deepcopy(model), x))
        else:
            _equal_to_class_forward(model, x)
            _equal_to_class_forward(model, x)
    if how.endswith("hook"):
        assert len(hits) == 4


@pytest.mark.parametrize("change", ["weight_inplace", "new_classifier", "new_body_member", "bn_stats",
                                    "features_hook", "model_hook", "clear_cache", "new_linear_bias"])
def test_changes_reach_the_output(change):
    original = _model()
    model, report = fuse(original)
    x = _input()
    _warm(model, x)
    hits = []
    with torch.no_grad():
        if change == "weight_inplace":
            for m in (original, model):
                m.classifier[1].weight.mul_(-0.5)
        elif change == "new_classifier":
            new = nn.Sequential(nn.Dropout(0.1), nn.Linear(40, 3)).eval()
            original.classifier = new
            model.classifier = copy.deepcopy(new)
        elif change == "new_linear_bias":
            for m in (original, model):
                m.classifier[1].bias = nn.Parameter(torch.ones(7))
        elif change == "new_body_member":
            original.features[5] = nn.Sequential(nn.Conv2d(32, 40, 1), nn.ReLU()).eval()
            model.features[5] = copy.deepcopy(original.features[5])
        elif change == "bn_stats":
            key = "features.4.conv.7.running_mean"
            original.state_dict()[key].add_(0.25)
            model.state_dict()[report.key_map().get(key, key)].add_(0.25)  # (fuse() moved the module)
        elif change == "features_hook":
            model.features.register_forward_hook(lambda *a: hits.append(1))
        elif change == "model_hook":
            model.register_forward_hook(lambda *a: hits.append(1))
        elif change == "clear_cache":
            lwkernels.clear_cache()
        for _ in range(3):
            _close(model(x), original(x))
    if change.endswith("hook"):
        assert len(hits) == 3


def test_state_dict_copies_pickles_and_to_reference():
    original = _model()
    model, report = fuse(original)
    x = _input()
    want = original(x).detach()
    _warm(model, x)
    key_map = report.key_map()
    assert set(model.state_dict()) == {key_map.get(k, k) for k in original.state_dict()}
    assert list(inspect.signature(model.forward).parameters)[0] == "x"
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        assert installed(other)._model is other and not installed(other).plans()
        with torch.no_grad():
            _close(_warm(other, x), want)
    reference = to_reference(model)
    assert _no_head(reference)
    with torch.no_grad():
        _close(reference(x), want)
    refused, report = fuse(reference)
    assert installed(refused) is not None and report.classifier_head is not None


def test_nan_and_inf_propagate_like_the_original():
    original = _model()
    model, _ = fuse(original)
    x = _input()
    _warm(model, x)
    x[0, 1, 5, 7] = float("nan")
    x[1, 0, 2, 2] = float("inf")
    with torch.no_grad():
        want, got = original(x), model(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))


def test_compile_and_export_see_the_class_forward():
    original = _model()
    model, _ = fuse(original)
    x = _input(1)
    _warm(model, x)
    with torch.no_grad():
        want = original(x)
        program = torch.export.export(model, (x,))
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert {"aten.adaptive_avg_pool2d.default", "aten.linear.default"} <= ops  # (the class's head)
        assert program.graph_signature.user_inputs == ("x",)
        _close(program.module()(x), want)
        traced = torch.jit.trace(model, x, check_trace=False)
        _close(traced(_input(1, seed=5)), original(_input(1, seed=5)))
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)  # (dynamo reads the forward)
        _close(compiled(x), want)
        torch._dynamo.reset()


def test_the_fused_model_goes_with_its_last_reference():
    """No reference cycle through the installed forward or its plans: the model (and the plans'
    work buffers) are freed as soon as the last user reference goes, without the garbage collector."""
    model, _ = fuse(_model())
    _warm(model, _input())
    assert installed(model).plans()
    box = [model]
    del model
    assert_freed_by_refcount(box)


def test_alternating_input_signatures_each_replay_their_own_plan(monkeypatch):
    original = _model()
    model, _ = fuse(original)
    a, b = _input(1), _input(3, channels_last=True, seed=9)
    with torch.no_grad():
        for _ in range(4):
            model(a)
            model(b)
        assert len(installed(model).plans()) == 2
        runs = []
        real_run = PreparedClassifier.run
        monkeypatch.setattr(PreparedClassifier, "run", lambda self, x: runs.append(1) or real_run(self, x))
        for _ in range(2):
            _close(model(a), original(a))
            _close(model(b), original(b))
    assert len(runs) == 4
