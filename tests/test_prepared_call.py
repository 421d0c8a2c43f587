"""JointBlock's prepared-call fast path (lwkernels/prepared_call.py): repeated eager CPU inference
replays a prepared kernel call, and every change to what the block reads — parameters in place or
reassigned, BatchNorm state and settings, submodules, the input's signature, the CPU path — is seen,
so the output always equals the plain PyTorch composition."""
import copy
import pickle
import threading

import pytest
import torch
from torch import nn

import lwkernels
from lwkernels import JointBlock
from lwkernels.cpu.backend import ISA_ENV
from lwkernels.cpu.prepared_call import PreparedCall
from helpers import cpu_paths_here, forced_isa, randomize_, tolerance


@pytest.fixture
def replays(monkeypatch):
    """Counts PreparedCall.run calls, so a test can tell a replay from a full call."""
    count = {"n": 0}
    run = PreparedCall.run

    def counting(self, x, residual):
        count["n"] += 1
        return run(self, x, residual)

    monkeypatch.setattr(PreparedCall, "run", counting)
    return count


def _block(mid_norm=False, bias=True, seed=0, **kwargs):
    kwargs.setdefault("dilation", 2)
    return randomize_(JointBlock(6, 10, mid_norm=mid_norm, bias=bias, **kwargs), seed).eval()


def _x(*shape, seed=1, channels_last=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _check(block, x, residual=None):
    """block(x) equals its plain composition, in x's memory format."""
    with torch.no_grad():
        y = block(x) if residual is None else block(x, residual)
        ref = block.to_reference().double()(x.double(), None if residual is None else residual.double())
    rtol, atol = tolerance(x.dtype, 9 + x.shape[1])
    assert y.dtype == x.dtype and y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
    return y


def _used_block():
    """A block and an input it has been called with twice (so its call is prepared and replayed)."""
    block = _block()
    x = _x(2, 6, 9, 11)
    _check(block, x)
    _check(block, x)
    return block, x


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mid_norm", [False, True], ids=["plain", "mid_bn"])
def test_repeated_calls_replay_and_stay_correct(replays, channels_last, mid_norm):
    block = _block(mid_norm=mid_norm)
    x = _x(2, 6, 9, 11, channels_last=channels_last)
    first = _check(block, x)
    assert replays["n"] == 0
    for _ in range(3):
        again = _check(block, x)
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        assert again.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert replays["n"] == 3


@pytest.mark.parametrize("nan_weight", [False, True], ids=["finite", "nan_weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_replay_with_weights_folded_once_equals_the_op(replays, dtype, channels_last, nan_weight):
    """The first call goes through the op, whose kernel folds the depthwise weights and mid BatchNorm
    itself; the replay passes them folded once at prepare time: identical outputs (a NaN weight's
    channel reaches every output through the pointwise conv: NaN everywhere, in both)."""
    block = _block(mid_norm=True).to(dtype)
    if nan_weight:
        with torch.no_grad():
            block.depthwise.weight[3, 0, 0, 2] = float("nan")
    x = _x(2, 6, 9, 11, channels_last=channels_last).to(dtype)
    with torch.no_grad():
        first = block(x)
        again = block(x)
    assert replays["n"] == 1
    if nan_weight:
        assert torch.isnan(first).all() and torch.isnan(again).all()
    else:
        assert torch.equal(first, again)


def test_residual_replays(replays):
    block = _block()
    x, r = _x(1, 6, 8, 8), _x(1, 10, 8, 8, seed=5)
    _check(block, x, r)
    _check(block, x, r)
    assert replays["n"] == 1
    _check(block, x)  # without the residual: not the prepared signature
    assert replays["n"] == 1
    _check(block, x, r.contiguous(memory_format=torch.channels_last))  # residual in another layout
    assert replays["n"] == 1


def _mutations():
    """(name, change) pairs; each change alters what the block computes."""
    def in_place_pointwise(b):
        b.pointwise.weight.mul_(-1.5)

    def in_place_depthwise(b):
        b.depthwise.weight.add_(0.25)

    def conv_bias(b):
        b.depthwise.bias.add_(1.0)

    def running_var(b):
        b.bn.running_var.mul_(3.0)

    def running_mean(b):
        b.bn.running_mean.add_(0.5)

    def bn_weight(b):
        b.bn.weight.mul_(2.0)

    def new_parameter(b):
        b.pointwise.weight = nn.Parameter(torch.randn_like(b.pointwise.weight))

    def new_bn(b):
        b.bn = randomize_(nn.BatchNorm2d(10), seed=7).eval()

    def new_activation(b):
        b.act = nn.ReLU6()

    def no_activation(b):
        b.act = nn.Identity()

    def eps(b):
        b.bn.eps = 0.5

    def load_state_dict(b):
        b.load_state_dict(_block(seed=9).state_dict())

    def padding(b):
        b.depthwise.padding = (0, 1)

    def dilation(b):
        b.depthwise.dilation = (1, 1)

    return [(f.__name__, f) for f in (in_place_pointwise, in_place_depthwise, conv_bias, running_var, running_mean,
                                      bn_weight, new_parameter, new_bn, new_activation, no_activation, eps,
                                      load_state_dict, padding, dilation)]


@pytest.mark.parametrize("name,change", _mutations(), ids=[n for n, _ in _mutations()])
def test_every_change_to_the_block_is_seen(replays, name, change):
    block = _block()
    x = 10 * _x(2, 6, 9, 11)  # large enough that some outputs pass ReLU6's cap
    before = _check(block, x)
    _check(block, x)
    assert replays["n"] == 1
    with torch.no_grad():
        change(block)
    after = _check(block, x)
    assert not torch.equal(after, before), f"test bug: {name} did not change the output"
    _check(block, x)  # prepared again for the changed block


def test_optimizer_step_is_seen():
    block = _block()
    x = _x(2, 6, 9, 11)
    before = _check(block, x)
    _check(block, x)
    opt = torch.optim.SGD(block.parameters(), lr=0.01)
    block(x).square().mean().backward()  # eval mode, grad on: goes through autograd, not a replay
    opt.step()
    assert not torch.equal(_check(block, x), before)


def test_input_signature_changes_are_seen(replays):
    block = _block()
    _check(block, _x(2, 6, 9, 11))
    _check(block, _x(2, 6, 9, 11, seed=3))  # same signature, other data
    assert replays["n"] == 1
    _check(block, _x(3, 6, 9, 11))
    _check(block, _x(2, 6, 7, 11))
    _check(block, _x(2, 6, 9, 11, channels_last=True))
    _check(block, _x(2, 6, 9, 22)[..., ::2])  # strided view
    _check(block, _x(2, 6, 9, 11).double().float())
    with pytest.raises(TypeError, match="dtype"):
        with torch.no_grad():
            block(_x(2, 6, 9, 11).double())
    with pytest.raises(ValueError, match="C_in=5"):
        with torch.no_grad():
            block(_x(2, 5, 9, 11))


def test_training_mode_and_grad_mode_are_not_replayed(replays):
    block = _block()
    x = _x(4, 6, 9, 11)
    _check(block, x)
    y = block(x)  # grad on, parameters require grad: autograd must record the call
    assert y.grad_fn is not None and replays["n"] == 0
    block.train()
    with torch.no_grad():
        y_train = block(x)
    ref = block.to_reference().train()
    with torch.no_grad():
        torch.testing.assert_close(y_train, ref(x), rtol=1e-5, atol=1e-5)
    assert replays["n"] == 0


def test_grad_mode_without_requires_grad_replays(replays):
    block = _block().requires_grad_(False)
    x = _x(2, 6, 9, 11)
    y0 = block(x)
    y1 = block(x)
    assert replays["n"] == 1 and y1.grad_fn is None
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    block.pointwise.weight.requires_grad_(True)  # no version bump, but now autograd must see the call
    assert block(x).grad_fn is not None
    assert replays["n"] == 1


@pytest.mark.skipif(len(cpu_paths_here()) < 2, reason="needs two CPU paths")
def test_cpu_path_changes_are_seen(replays):
    block = _block()
    x = _x(2, 6, 9, 11)
    with forced_isa(cpu_paths_here()[0]):
        _check(block, x)
        _check(block, x)
    assert replays["n"] == 1
    with forced_isa(cpu_paths_here()[1]):
        _check(block, x)
    assert replays["n"] == 1


def test_bad_isa_setting_is_reported_after_replays():
    block, x = _used_block()
    with forced_isa("sse9"), pytest.raises(ValueError, match=ISA_ENV):
        with torch.no_grad():
            block(x)


def test_data_writes_need_clear_cache(replays):
    """Writes through .data bypass version counters (documented); clear_cache() makes them visible."""
    block = _block()
    x = _x(2, 6, 9, 11)
    _check(block, x)
    block.pointwise.weight.data.mul_(-2.0)
    lwkernels.clear_cache()
    _check(block, x)
    assert replays["n"] == 0


def test_pickle_and_deepcopy_after_replays():
    block, x = _used_block()
    for clone in (pickle.loads(pickle.dumps(block)), copy.deepcopy(block)):
        assert "_prepared" not in clone.__dict__
        _check(clone, x)
        with torch.no_grad():
            clone.pointwise.weight.mul_(0.5)  # a clone's parameters are its own
        _check(clone, x)
    _check(block, x)


def test_inference_mode_parameters_are_never_replayed(replays):
    with torch.inference_mode():
        block = _block()
        x = _x(2, 6, 9, 11)
        y0 = block(x)
        y1 = block(x)
    assert replays["n"] == 0
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)


def test_concurrent_replays_from_threads():
    block = _block()
    xs = [_x(2, 6, 9, 11, seed=s) for s in range(4)]
    with torch.no_grad():
        expected = [block(x) for x in xs]
    errors = []

    def worker(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    torch.testing.assert_close(block(xs[i]), expected[i], rtol=0, atol=0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_compile_does_not_replay(replays):
    block = _block()
    x = _x(2, 6, 9, 11)
    _check(block, x)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-6, atol=1e-6)
