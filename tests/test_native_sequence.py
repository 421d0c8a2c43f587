"""A replay whose members are all prepared calls runs them as one native CallSequence
(cpu/native_sequence.py, csrc/call_sequence.h): the same kernels with the same operands, so the
output is exactly what the replay from Python gives; every change that stops the replay stops the
sequence too; a busy sequence or another input signature goes the Python way. JointChain's plan
runs its blocks the same way (cpu/prepared_chain.py)."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import lwkernels
import lwkernels.nn.layout_sequential as layout_sequential
from helpers import randomize_
from lwkernels import JointBlock, JointChain, LayoutSequential, fuse
from lwkernels.cpu.backend import native
from lwkernels.cpu.native_sequence import NativeSequence
from lwkernels.cpu.prepared_chain import PreparedChain
from lwkernels.cpu.prepared_sequence import PreparedSequence
from lwkernels.models import LightweightNet, MobileNetV1

CL = torch.channels_last


class Residual(nn.Module):
    """A hand-written inverted residual with its add in forward (fuse() makes a GraphModule of it)."""

    def __init__(self, c: int, e: int, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
            nn.Conv2d(e, e, k, padding=k // 2, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
            nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


def _ir(cin, e, cout, stride, k=3):
    return nn.Sequential(
        nn.Conv2d(cin, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
        nn.Conv2d(e, e, k, stride, k // 2, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
        nn.Conv2d(e, cout, 1, bias=False), nn.BatchNorm2d(cout))


def _plain_model() -> nn.Sequential:
    """Every member fusable: a dense stem (NCHW), inverted residuals that run channels-last from
    16x16 on (so the sequence changes layout), residual ones, an nn.Identity, a JointBlock, a 1x1
    ConvBNAct; 7x7 and 5x5 kernels, odd widths."""
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),  # 0 stem, 32x32
        _ir(16, 48, 24, 2),                                                                   # 1 -> 16x16
        Residual(24, 72),                                                                     # 2
        nn.Sequential(_ir(24, 72, 36, 2, 5), nn.Identity()),                                  # 3 -> 8x8
        Residual(36, 108, 5),                                                                 # 4
        nn.Sequential(nn.Conv2d(36, 36, 3, 1, 1, groups=36, bias=False), nn.BatchNorm2d(36),  # 5 joint
                      nn.Conv2d(36, 52, 1, bias=False), nn.BatchNorm2d(52), nn.ReLU()),
        nn.Sequential(nn.Conv2d(52, 80, 1, bias=False), nn.BatchNorm2d(80), nn.ReLU6()),      # 6 1x1
    )
    return randomize_(model, seed=5).eval()


def _fused(dtype=torch.float32) -> LayoutSequential:
    model, report = fuse(_plain_model().to(dtype))
    assert isinstance(model, LayoutSequential), report
    return model


def _input(dtype=torch.float32, channels_last=False, batch=2, seed=11):
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.contiguous(memory_format=CL) if channels_last else x


def _replay(model: LayoutSequential) -> PreparedSequence:
    plans = model.__dict__["_layout_plans"]
    assert len(plans) == 1
    return next(iter(plans.values())).replay


def _python_replay(dtype, x):
    """The output of the same replay, with its calls made from Python (a model of its own)."""
    model = _fused(dtype)
    PreparedSequence.use_native = False
    try:
        y = _warm(model, x)
        assert _replay(model)._native is False
        return y
    finally:
        PreparedSequence.use_native = True


def _modules_path(model, x):
    layout_sequential.REPLAY_MEMBERS = False
    try:
        return model(x)
    finally:
        layout_sequential.REPLAY_MEMBERS = True


def _warm(model, x):
    for _ in range(3):
        y = model(x)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_all_members_run_as_one_native_sequence(dtype, channels_last, batch):
    original = _plain_model().to(dtype)
    model = _fused(dtype)
    x = _input(dtype, channels_last, batch)
    with torch.no_grad():
        want = original(x)
        python_path = _python_replay(dtype, x)
        _warm(model, x)
        native = _replay(model)._native
        assert isinstance(native, NativeSequence)
        calls = sum(len(step[1]) for step in _replay(model)._steps)
        assert calls == 7  # stem, 4 inverted residuals, the joint block, the 1x1 conv (the Identity: none)
        # the layout changes: the stem writes NHWC itself; a channels-last input is transposed for
        # the stem, the last call's output back to NCHW for an NCHW caller
        labels = native.step_labels()
        assert len(native) == calls + 1
        assert labels[int(channels_last)].startswith("PreparedDenseConv") and labels[int(channels_last)].endswith("NHWC out")
        got = model(x)
        assert torch.equal(got, python_path)
        assert torch.equal(got, _modules_path(model, x))
    assert got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    torch.testing.assert_close(got, want, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-5)


MUTATIONS = {
    "running mean updated in place": lambda m: m[2].conv[0][0][1].running_mean.add_(0.5),
    "depthwise weight updated in place": lambda m: m[5][0].depthwise.weight.mul_(2),
    "project weight updated in place": lambda m: m[4].conv[0][1].pointwise.weight.mul_(-1),
    "stem weight replaced": lambda m: setattr(m[0][0], "weight", nn.Parameter(torch.randn_like(m[0][0].weight))),
    "batch norm put in training mode": lambda m: m[5][0].bn.train(),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_sequence_sees_what_the_modules_would(mutation):
    model = _fused()
    x = _input()
    with torch.no_grad():
        before = _warm(model, x)
        assert isinstance(_replay(model)._native, NativeSequence)
        MUTATIONS[mutation](model)
        for _ in range(3):  # a stale replay, the modules' path, then a fresh replay and sequence
            got = model(x)
            assert torch.equal(got, _modules_path(model, x)), mutation
    assert not torch.equal(got, before), "the mutation must change the output for this test to mean anything"


def test_a_busy_sequence_leaves_the_call_to_python():
    model = _fused()
    x = _input()
    with torch.no_grad():
        want = _warm(model, x)
        native = _replay(model)._native
        assert native._lock.acquire(blocking=False)
        try:
            got = model(x)
        finally:
            native._lock.release()
    assert torch.equal(got, want)


def test_an_input_of_another_layout_goes_the_python_way():
    model = _fused()
    x = _input()
    with torch.no_grad():
        want = _warm(model, x)
        native = _replay(model)._native
        assert not native.matches(x.contiguous(memory_format=CL))
        assert not native.matches(x[:1])
        assert native.matches(x)
        got = _replay(model).run(x.contiguous(memory_format=CL), CL)  # (its members check their inputs)
        assert got.is_contiguous(memory_format=CL)
        assert torch.equal(got.contiguous(), want.contiguous())


def test_a_member_called_as_a_module_means_no_sequence():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 1.5

    plain = _plain_model()
    plain.insert(3, Scale())
    model, _ = fuse(plain)
    x = _input()
    with torch.no_grad():
        _warm(model, x)
        assert _replay(model)._native is False
        assert torch.equal(model(x), _modules_path(model, x))


def test_clear_cache_drops_the_sequence():
    model = _fused()
    x = _input()
    with torch.no_grad():
        want = _warm(model, x)
        replay = _replay(model)
        assert isinstance(replay._native, NativeSequence)
        lwkernels.clear_cache()
        assert replay._native is False
        assert torch.equal(_warm(model, x), want)


def test_joint_chain_runs_its_blocks_as_one_sequence():
    torch.manual_seed(0)
    blocks = [JointBlock(16, 24, stride=2), JointBlock(24, 24, dilation=2), JointBlock(24, 40, kernel_size=5),
              JointBlock(40, 40)]
    chain = JointChain(*[randomize_(b, seed=i) for i, b in enumerate(blocks)]).eval()
    x = torch.randn(2, 16, 30, 30)
    with torch.no_grad():
        # four blocks of 16+ channels: they run channels-last inside, between a transpose in and one out
        want = x.contiguous(memory_format=torch.channels_last)
        for b in blocks:
            want = b(want)
        want = want.contiguous()
        for _ in range(3):
            got = chain(x)
        plan = chain.__dict__.get("_plan")
        assert isinstance(plan, PreparedChain) and len(plan._seq) == 6
    assert torch.equal(got, want) and got.is_contiguous()


@pytest.mark.parametrize("bad, message", [
    (dict(x=2, y=2), "must not write the slot it reads"),
    (dict(x=1, y=0), "no call may write the input slot"),
    (dict(x=2, y=1), "no earlier call filled"),
    (dict(x=0, y=7), "out of range"),
])
def test_call_sequence_rejects_impossible_slots(bad, message):
    seq = native().CallSequence_f32()
    with pytest.raises(ValueError, match=message):
        seq.add_transpose(1, 4, 9, True, "scalar", bad["x"], bad["y"])


def test_an_empty_call_sequence_says_so():
    with pytest.raises(ValueError, match="no calls to run"):
        native().CallSequence_f32().run(0, 0, 1)


@pytest.mark.parametrize("where", ["inverted residual", "joint block"])
def test_a_nan_depthwise_weight_gives_what_the_modules_give(where):
    """The sequence folds each call's depthwise weights once; a NaN among them must still make its
    channel NaN everywhere, also at the borders where kernels skip the padded taps, as the unfolded
    calls do (the pointwise conv after it then spreads the NaN to every output)."""
    model = _fused()
    x = _input()
    with torch.no_grad():
        dw = model[2].conv[0][1].depthwise if where == "inverted residual" else model[5][0].depthwise
        dw.weight[3, 0, 0, 0] = float("nan")
        got = _warm(model, x)
        assert isinstance(_replay(model)._native, NativeSequence)
        want = _modules_path(model, x)
    assert got.isnan().all()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_call_sequence_rejects_a_residual_smaller_than_the_output():
    seq = native().CallSequence_f32()
    seq.add_transpose(1, 4, 9, True, "scalar", seq.INPUT, seq.WORK_A)  # 36 elements in WORK_A
    # a 1x1 "joint block" 4 -> 8 channels on 3x3: 72 output elements, residual WORK_A holds 36
    g = native().JointGeometry(batch=1, in_channels=4, in_h=3, in_w=3, out_channels=8, out_h=3, out_w=3,
                               kernel_h=1, kernel_w=1, stride_h=1, stride_w=1, pad_h=0, pad_w=0, dil_h=1,
                               dil_w=1, layout="nhwc")
    w = torch.randn(8, 4)
    packed = native().pack_pointwise_f32("scalar", "nhwc", w.data_ptr(), 8, 4)
    ones = torch.ones(4)
    with pytest.raises(ValueError, match="residual slot holds fewer elements"):
        seq.add_joint(packed, g, ones.data_ptr(), 0, 0, "none", 0, 0, "none", seq.WORK_A, seq.WORK_A, seq.OUTPUT)
    with pytest.raises(ValueError, match="dw_weight is null"):
        seq.add_joint(packed, g, 0, 0, 0, "none", 0, 0, "none", seq.WORK_A, seq.NO_SLOT, seq.OUTPUT)
    assert len(seq) == 1  # neither refused call was added


def _native_of(model: LayoutSequential, x):
    with torch.no_grad():
        want = _warm(model, x)
    native = _replay(model)._native
    assert isinstance(native, NativeSequence)
    return native, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_image_groups_give_the_bits_of_the_whole_batch(dtype, channels_last):
    """A run may take the batch a few images at a time (CallSequence's image groups); the kernels
    compute every element the same way whatever the batch, so any grouping, even groups of unequal
    size, gives the whole batch's bits. The first member adds the caller's input as its residual."""
    plain = nn.Sequential(Residual(3, 12), *list(_plain_model().children()))
    model, report = fuse(randomize_(plain, seed=8).eval().to(dtype))
    assert isinstance(model, LayoutSequential), report
    x = _input(dtype, channels_last, batch=5)
    native, want = _native_of(model, x)
    seq = native._seq
    assert seq.image_group == 5  # small images: the whole batch fits the cache budget
    with torch.no_grad():
        for images in (1, 2, 3, 4, 5, 9):
            seq.set_image_group(images)
            assert seq.image_group == min(images, 5)
            got = model(x)
            assert _replay(model)._native is native
            assert torch.equal(got, want), images


def test_a_batch_larger_than_the_cache_budget_runs_in_groups():
    torch.manual_seed(0)
    blocks = [randomize_(JointBlock(16 if i == 0 else 32, 32), seed=i) for i in range(4)]
    chain = JointChain(*blocks).eval()
    x = torch.randn(3, 16, 160, 160)  # 6.5 MB per image through the widest block
    with torch.no_grad():
        for _ in range(3):
            got = chain(x)
        seq = chain.__dict__["_plan"]._seq
        assert 1 <= seq.image_group < 3
        seq.set_image_group(3)
        assert seq.image_group == 3
        assert torch.equal(chain(x), got)


def test_call_sequence_runs_whole_when_its_output_slot_is_also_read():
    """Groups find the output slot at their first image, which only works when no call reads it."""
    seq = native().CallSequence_f32()
    seq.add_transpose(2, 4, 9, True, "scalar", seq.INPUT, seq.OUTPUT)
    seq.add_transpose(2, 4, 9, False, "scalar", seq.OUTPUT, seq.WORK_A)
    seq.add_transpose(2, 4, 9, True, "scalar", seq.WORK_A, seq.OUTPUT)
    seq.set_image_group(1)
    assert seq.image_group == 2
    x = torch.randn(2, 4, 3, 3)
    y = torch.empty(2, 9, 4)
    seq.run(x.data_ptr(), y.data_ptr(), 2)
    assert torch.equal(y, x.flatten(2).transpose(1, 2))


def test_call_sequence_rejects_calls_of_another_batch_and_a_negative_group():
    seq = native().CallSequence_f32()
    seq.add_transpose(1, 4, 9, True, "scalar", seq.INPUT, seq.WORK_A)
    with pytest.raises(ValueError, match="same batch"):
        seq.add_transpose(2, 4, 9, False, "scalar", seq.WORK_A, seq.OUTPUT)
    with pytest.raises(ValueError, match="image group"):
        seq.set_image_group(-1)
    assert len(seq) == 1


def test_step_times_cover_every_call_of_a_run():
    model = _fused()
    x = _input()
    with torch.no_grad():
        want = _warm(model, x)
        native = _replay(model)._native
        assert native.step_seconds() == []  # (off by default)
        native.time_steps(True)
        start = time.perf_counter()
        got = model(x)
        wall = time.perf_counter() - start
        seconds, labels, threads = native.step_seconds(), native.step_labels(), native.step_threads()
        native.time_steps(False)
        assert native.step_seconds() == [] and native.step_threads() == []
    assert torch.equal(got, want)  # (timing changes nothing)
    assert len(seconds) == len(labels) == len(threads) == len(native)
    assert all(s > 0 for s in seconds) and sum(seconds) <= wall
    n = torch.get_num_threads()
    for s, t in zip(seconds, threads):
        assert t["alone"] + t["region"] == pytest.approx(s, rel=1e-6, abs=1e-9)
        # (a call with too little work for two tasks runs on the calling thread alone: no region)
        assert 0 <= t["region"] <= s and 0 <= t["busy"] <= n * t["region"] + 1e-9
        assert t["idle"] == pytest.approx(n * t["region"] - t["busy"], abs=1e-9)
    assert n == 1 or sum(t["busy"] for t in threads) > 0
    calls = [label for label in labels if not label.startswith("transpose")]
    assert len(calls) == len(native._calls) and all(" -> " in label for label in calls)


def test_a_model_plan_times_its_stem_blocks_and_head():
    from lwkernels.models import MobileNetV1

    model = randomize_(MobileNetV1(num_classes=10, width_mult=0.25), seed=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for _ in range(3):
            want = model(x)
        plan = model.features.__dict__["_head_plan"]
        plan.time_steps(True)
        got = model(x)
        seconds, labels = plan.step_seconds(), plan.step_labels()
        plan.time_steps(False)
    assert torch.equal(got, want)
    assert len(seconds) == len(labels) == len(plan._seq) and all(s > 0 for s in seconds)
    assert labels[0].startswith("PreparedDenseConv (2, 3, 64, 64)") and labels[-1].startswith("PreparedHead")
    assert sum(label.startswith("PreparedCall") for label in labels) == len(model.features)


def _ir_then_channels_last() -> nn.Sequential:
    """An inverted residual on a 32x32 output (NCHW) before two on 16x16 (channels-last), none
    with a residual: the first writes NHWC itself."""
    model = nn.Sequential(_ir(8, 24, 16, 1), _ir(16, 48, 24, 2), _ir(24, 72, 20, 1))
    return fuse(randomize_(model, seed=8).eval())[0]


#: Models whose native sequence has calls writing the other layout: (make, input shape, the labels
#: of those calls, by their start and end).
TRANSPOSED_OUTPUTS = {
    "MobileNetV1's stem": (lambda: randomize_(MobileNetV1(num_classes=10), seed=4).eval(), (3, 48, 40),
                           [("PreparedDenseConv", "NHWC out")]),
    "LightweightNet's RGB block": (lambda: randomize_(LightweightNet(num_classes=10), seed=6).eval(), (3, 40, 36),
                                   [("PreparedCall", "NHWC out")]),
    "an inverted residual": (_ir_then_channels_last, (8, 32, 32), [("PreparedInvertedResidual", "NHWC out")]),
}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", list(TRANSPOSED_OUTPUTS))
def test_a_call_before_a_layout_change_writes_the_other_layout_itself(case, batch, monkeypatch):
    """An NCHW call followed by a transpose of its output to NHWC is one kernel call writing NHWC,
    with exactly the values of the call and the separate transpose (a copy of the model whose plan
    keeps them apart)."""
    import copy

    import lwkernels.cpu.native_sequence as native_sequence
    from lwkernels.cpu.native_sequence import native_plans

    make, shape, expected = TRANSPOSED_OUTPUTS[case]
    model = make()
    apart = copy.deepcopy(model)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))

    def labels_of(m):  # of the plan that runs the whole model (a chain keeps one without its head too)
        return max((plan.step_labels() for plan in native_plans(m)),
                   key=lambda labels: (labels[-1].startswith("PreparedHead"), len(labels)))

    with torch.no_grad():
        merged = [model(x) for _ in range(3)]
        labels = labels_of(model)
        monkeypatch.setattr(native_sequence, "_writes_transposed_alike", lambda steps, i: False)
        separate = [apart(x) for _ in range(3)]
        apart_labels = labels_of(apart)
    written = [label for label in labels if label.endswith(" out")]
    assert [(w.split(" ")[0], w[-8:]) for w in written] == expected, labels
    assert len(apart_labels) == len(labels) + len(written)
    assert sum(label.startswith("transpose") for label in apart_labels) == \
        sum(label.startswith("transpose") for label in labels) + len(written)
    for got, want in zip(merged, separate):
        assert torch.equal(got, want)


def test_dense_conv_writes_the_other_layout_only_where_its_values_agree():
    """A 1x1 ConvBNAct runs on the joint kernel and writes either layout alike; a k x k one writes
    NHWC through its own kernel, alike only for the activations it applies in registers."""
    from lwkernels import ConvBNAct

    x = torch.randn(1, 8, 5, 5)
    pointwise = randomize_(ConvBNAct(8, 16, 1, padding=0), seed=1).eval()
    hardswish = randomize_(ConvBNAct(4, 16, 3, padding=1, activation="hardswish"), seed=2).eval()
    with torch.no_grad():
        pointwise(x)
        hardswish(x[:, :4])
    assert pointwise.__dict__["_prepared"].writes_transposed_alike
    call = hardswish.__dict__["_prepared"]
    assert not call.writes_transposed_alike
    seq = native().CallSequence_f32()
    with pytest.raises(ValueError, match="other layout"):
        call.append_to(seq, seq.INPUT, seq.NO_SLOT, seq.OUTPUT, transposed=True)


def test_call_sequence_rejects_a_residual_with_the_other_layout():
    block = randomize_(JointBlock(8, 8), seed=3).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        block(x)
    seq = native().CallSequence_f32()
    with pytest.raises(ValueError, match="y_transposed"):
        block.__dict__["_prepared"].append_to(seq, seq.INPUT, seq.INPUT, seq.OUTPUT, transposed=True)


def test_small_outputs_are_made_ahead_but_handed_out_once():
    """Outputs of up to SMALL_OUTPUT_BYTES come from a stock made OUTPUT_STOCK at a time
    (cpu/outputs.py): every run must still return a tensor of its own, holding its own result."""
    from lwkernels.cpu.outputs import OUTPUT_STOCK, SMALL_OUTPUT_BYTES
    original, model = _plain_model(), _fused()
    x0 = _input(batch=1)
    with torch.no_grad():
        _warm(model, x0)
        native = _replay(model)._native
        assert isinstance(native, NativeSequence)
        first = model(x0)
        assert first.numel() * first.element_size() <= SMALL_OUTPUT_BYTES  # (this test needs a small one)
        inputs = [_input(batch=1, seed=100 + i) for i in range(3 * OUTPUT_STOCK)]
        outputs = [model(x) for x in inputs]
        assert len({y.data_ptr() for y in outputs + [first]}) == len(outputs) + 1
        for x, y in zip(inputs, outputs):
            torch.testing.assert_close(y, original(x), rtol=1e-4, atol=1e-5)


def test_outputs_made_ahead_follow_inference_mode():
    """A small output made under inference_mode is an inference tensor for good: the stock made
    there must not serve a call outside it (whose output could not be saved for backward)."""
    model, x = _fused(), _input(batch=1)
    w = torch.ones(1, requires_grad=True)
    with torch.inference_mode():
        _warm(model, x)
        assert isinstance(_replay(model)._native, NativeSequence)
        assert model(x).is_inference()
    with torch.no_grad():
        y = model(x)
    assert not y.is_inference()
    (y * w).sum().backward()  # raises for an inference tensor
    with torch.inference_mode():
        assert model(x).is_inference()


@pytest.mark.parametrize("shape", [(2, 10), (4, 64, 8, 8), (1, 1, 128, 129)])
def test_output_maker_hands_out_distinct_dense_tensors(shape):
    from lwkernels.cpu.outputs import OUTPUT_STOCK, OutputMaker
    fmt = torch.channels_last if len(shape) == 4 and shape[1] > 1 else torch.contiguous_format
    maker = OutputMaker(native(), shape, torch.float32, fmt)
    taken = [maker.take() for _ in range(2 * OUTPUT_STOCK + 1)]
    assert len({t.data_ptr() for t in taken}) == len(taken)
    for t in taken:
        assert t.shape == shape and t.dtype == torch.float32 and t.is_contiguous(memory_format=fmt)
