"""JointChain.classify (lwkernels/nn/chain.py, cpu/prepared_head.py): a model's classifier head —
average pooling to 1 x 1, dropout, nn.Linear — after a chain. In eager CPU inference the head runs as
one more fused call at the end of the chain's native sequence; every call returns the same values,
within rounding of PyTorch's own head, and anything the fused head does not cover (other modules,
training mode, autograd, hooks) runs the modules themselves, exactly."""
import pytest
import torch
from torch import nn

import lwkernels
from lwkernels import ConvBNAct, JointBlock, JointChain
from lwkernels.cpu.prepared_chain import PreparedChain
from lwkernels.models import LightweightNet, MobileNetV1
from lwkernels.nn.chain import classify, plain_head
from helpers import assert_freed_by_refcount, cpu_paths_here, forced_isa, randomize_, tolerance

# Four wide blocks (the chain runs them channels-last inside) after an RGB one; odd sizes.
SPECS = [(3, 16, 2, 1), (16, 24, 1, 2), (24, 24, 2, 1), (24, 17, 1, 3), (17, 40, 1, 1)]


def _parts(dtype=torch.float32, classes=11, seed=0, specs=SPECS):
    chain = JointChain(*[JointBlock(ci, co, stride=s, dilation=d) for ci, co, s, d in specs])
    chain = randomize_(chain, seed).to(dtype).eval()
    linear = nn.Linear(specs[-1][1], classes).to(dtype)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g, dtype=dtype))
        linear.bias.copy_(torch.randn(linear.bias.shape, generator=g, dtype=dtype))
    return chain, nn.AdaptiveAvgPool2d(1), nn.Dropout(0.2).eval(), linear


def _x(*shape, channels_last=False, dtype=torch.float32, seed=3):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _head_plan(chain):
    plan = chain.__dict__.get("_head_plan")
    assert isinstance(plan, PreparedChain)
    return plan


@pytest.mark.parametrize("isa", cpu_paths_here())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_fused_head_gives_pytorchs_head(isa, dtype, channels_last, batch):
    chain, pool, dropout, linear = _parts(dtype)
    x = _x(batch, 3, 29, 23, channels_last=channels_last, dtype=dtype)
    with forced_isa(isa), torch.no_grad():
        first = chain.classify(x, pool, dropout, linear)
        plan = _head_plan(chain)
        again = chain.classify(x, pool, dropout, linear)
        assert chain.__dict__["_head_plan"] is plan  # replayed, not prepared again
        want = plain_head(chain(x).double(), pool, dropout, linear.double())
    assert first.shape == (batch, 11) and first.dtype == dtype and first.is_contiguous()
    assert again.shape == first.shape and again.stride() == first.stride() and torch.equal(again, first)
    rtol, atol = tolerance(dtype, 40)
    torch.testing.assert_close(first.double(), want, rtol=rtol, atol=atol)


def test_the_head_reads_the_chains_last_output_in_every_layout():
    """The chain's plan leaves its last output channels-last (wide float32 chain) or in the
    caller's layout (narrow chain, float64); a one-pixel map and no dropout too."""
    for specs, dtype, size in [(SPECS, torch.float32, 30), (SPECS[:2], torch.float32, 30),
                               (SPECS, torch.float64, 30), (SPECS, torch.float32, 5)]:
        chain, pool, _, linear = _parts(dtype, specs=specs)
        x = _x(2, 3, size, size, dtype=dtype)
        with torch.no_grad():
            first = chain.classify(x, pool, None, linear)
            again = chain.classify(x, pool, None, linear)
            want = plain_head(chain(x), pool, None, linear)
        assert torch.equal(again, first)
        rtol, atol = tolerance(dtype, 40)
        torch.testing.assert_close(first, want, rtol=rtol, atol=atol)


CHANGES = {
    "linear weight updated in place": lambda p: p["linear"].weight.mul_(-2),
    "linear bias replaced": lambda p: setattr(p["linear"], "bias", nn.Parameter(torch.randn(11))),
    "a block's weight updated in place": lambda p: p["chain"][3].pointwise.weight.mul_(0.5),
    "dropout in training mode": lambda p: p["dropout"].train(),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_to_what_the_head_reads_is_seen(change):
    chain, pool, dropout, linear = _parts()
    parts = dict(chain=chain, pool=pool, dropout=dropout, linear=linear)
    x = _x(2, 3, 26, 26)
    with torch.no_grad():
        chain.classify(x, pool, dropout, linear)
        before = chain.classify(x, pool, dropout, linear)
        CHANGES[change](parts)
        if change == "dropout in training mode":
            dropout.p = 0.0  # (training mode, but deterministic)
        got = chain.classify(x, pool, dropout, linear)
        want = plain_head(chain(x), pool, dropout, linear)
    if change == "dropout in training mode":  # not a head it fuses: the modules, exactly
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, before), "the change must matter to this test"


def test_other_modules_hooks_and_autograd_run_the_modules():
    chain, pool, dropout, linear = _parts()
    x = _x(2, 3, 20, 20)
    with torch.no_grad():
        max_pool = nn.AdaptiveMaxPool2d(1)
        assert torch.equal(chain.classify(x, max_pool, dropout, linear), plain_head(chain(x), max_pool, dropout, linear))
        seen = []
        handle = linear.register_forward_hook(lambda m, args, out: seen.append(out.shape))
        got = chain.classify(x, pool, dropout, linear)
        handle.remove()
        assert seen == [(2, 11)] and torch.equal(got, plain_head(chain(x), pool, dropout, linear))
        want = chain.classify(x, pool, dropout, linear)
        handle = chain.register_forward_hook(lambda m, args, out: seen.append(out.shape))
        assert torch.equal(chain.classify(x, pool, dropout, linear), want)  # (fused head, chain called)
        handle.remove()
        assert seen == [(2, 11), (2, 40, 5, 5)]
    got = chain.classify(x, pool, dropout, linear)  # grad enabled, parameters require grad
    assert got.requires_grad and got.grad_fn is not None
    got.sum().backward()
    assert linear.weight.grad is not None and chain[0].pointwise.weight.grad is not None


def test_clear_cache_and_a_nan_input():
    chain, pool, dropout, linear = _parts()
    x = _x(1, 3, 24, 24)
    with torch.no_grad():
        want = chain.classify(x, pool, dropout, linear)
        lwkernels.clear_cache()
        assert torch.equal(chain.classify(x, pool, dropout, linear), want)
        assert torch.equal(chain.classify(x, pool, dropout, linear), want)
        x[0, 1, 5, 7] = float("nan")
        got = chain.classify(x, pool, dropout, linear)
        ref = plain_head(chain(x), pool, dropout, linear)
    assert ref.isnan().all()  # (the NaN reaches every channel, then every class)
    torch.testing.assert_close(got, ref, equal_nan=True)


@pytest.mark.parametrize("model_class", [MobileNetV1, LightweightNet])
def test_models_classify_through_the_fused_head(model_class):
    model = randomize_(model_class(num_classes=10, width_mult=0.25), seed=4).eval()
    reference = model.to_reference()
    x = _x(2, 3, 64, 64)
    with torch.no_grad():
        first, again = model(x), model(x)
        assert isinstance(model.features.__dict__.get("_head_plan"), PreparedChain)
        want = reference(x)  # (its features are an nn.Sequential: classify() runs the modules)
        assert torch.equal(classify(reference.features, reference.stem(x) if hasattr(reference, "stem") else x,
                                    reference.pool, getattr(reference, "dropout", None), reference.classifier), want)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-5)


def test_a_convbnact_stem_joins_the_plan():
    stem = randomize_(ConvBNAct(3, 16, 3, stride=2, padding=1), seed=9).eval()
    chain, pool, dropout, linear = _parts(specs=SPECS[1:])
    x = _x(2, 3, 40, 40)
    with torch.no_grad():
        first = chain.classify(x, pool, dropout, linear, stem)
        plan = _head_plan(chain)
        again = chain.classify(x, pool, dropout, linear, stem)
        assert chain.__dict__["_head_plan"] is plan and plan.matches(chain, x, (pool, dropout, linear), stem)
        assert torch.equal(again, first)
        torch.testing.assert_close(first, plain_head(chain(stem(x)), pool, dropout, linear), rtol=1e-5, atol=1e-5)
        stem[0].weight.mul_(-1)  # what the stem reads is watched
        got = chain.classify(x, pool, dropout, linear, stem)
        torch.testing.assert_close(got, plain_head(chain(stem(x)), pool, dropout, linear), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, first)
        seen = []
        for module in (stem, stem[0]):  # hooks on the stem or its conv: called (the conv's by PyTorch's)
            handle = module.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
            torch.testing.assert_close(chain.classify(x, pool, dropout, linear, stem), got, rtol=1e-5, atol=1e-5)
            handle.remove()
        assert seen == ["ConvBNAct", "Conv2d"]
        other = randomize_(nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU()), seed=9).eval()
        for _ in range(2):  # not a ConvBNAct: it runs as a module, and the plan does not take it
            torch.testing.assert_close(chain.classify(x, pool, dropout, linear, other),
                                       plain_head(chain(other(x)), pool, dropout, linear), rtol=1e-5, atol=1e-5)
            assert not _head_plan(chain).matches(chain, x, (pool, dropout, linear), other)


def test_a_model_with_plans_goes_with_its_last_reference():
    """The plans refer to their chain weakly: a model is freed (with the plans' buffers) as soon as
    its last reference goes, without the garbage collector."""
    model = MobileNetV1(num_classes=10, width_mult=0.25).eval()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(1, 3, 64, 64))
    assert model.features.__dict__.get("_head_plan") is not None
    box = [model]
    del model
    assert_freed_by_refcount(box)
