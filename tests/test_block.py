"""JointBlock as a drop-in nn.Module: state_dicts, conversion from/to the plain PyTorch composition,
eval (fused) and training (batch statistics) equal to the reference, dtype moves, hooks, and
constructor errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import OpRecorder, plain_forward, plain_modules, randomize_
from lwkernels import JointBlock, JointBlockReference

# PyTorch's own convolutions (the references, the backward) on one thread: see conftest.single_thread.
pytestmark = pytest.mark.usefixtures("single_thread")

F64 = dict(rtol=1e-10, atol=1e-10)
F32 = dict(rtol=1e-5, atol=1e-4)  # float32 block vs float64 reference: accumulation lengths here are < 100


def make_block(c_in=6, c_out=10, seed=0, **kwargs) -> JointBlock:
    return randomize_(JointBlock(c_in, c_out, **kwargs), seed)


def plain_twin(block: JointBlockReference, dtype=torch.float64) -> nn.ModuleDict:
    """Deep copies of the block's conv/BN submodules in a plain nn.ModuleDict (same names)."""
    mods = {"depthwise": block.depthwise}
    if block.mid_bn is not None:
        mods["mid_bn"] = block.mid_bn
    mods.update(pointwise=block.pointwise, bn=block.bn)
    return copy.deepcopy(nn.ModuleDict(mods)).to(dtype)


def act_names(block):
    from lwkernels.ops.activation import activation_name
    return activation_name(block.mid_act), activation_name(block.act)


def rand(*shape, seed=0, dtype=torch.float32, fmt=torch.contiguous_format, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).contiguous(memory_format=fmt)


VARIANTS = {
    "seed": dict(dilation=3),
    "mobilenet_v1": dict(mid_norm=True, stride=2),
    "relu6_bias": dict(activation="relu6", bias=True, dilation=2),
    "no_act_mid_relu": dict(activation=None, mid_activation="relu", kernel_size=5, padding=1),
    "mid_norm_relu6": dict(mid_norm=True, activation="relu6", bias=True, stride=2, dilation=2),
}
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


# -- state_dicts and conversion ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trips(variant):
    """JointBlock, JointBlockReference and a plain nn.ModuleDict of the same submodules have
    identical state_dict keys and load each other's state_dicts."""
    kwargs = VARIANTS[variant]
    block = make_block(seed=1, **kwargs).eval()
    ref = block.to_reference()
    plain = plain_twin(block, torch.float32)
    keys = list(block.state_dict())
    assert keys == list(ref.state_dict()) == list(plain.state_dict())
    assert "bn.running_mean" in keys and "depthwise.weight" in keys
    # Load a different block's state into each, and back.
    other = make_block(seed=2, **kwargs).eval()
    for target in (block, ref, plain):
        target.load_state_dict(other.state_dict())
        for k, v in other.state_dict().items():
            assert torch.equal(target.state_dict()[k], v), k
    fresh = JointBlock(6, 10, **kwargs).eval()
    fresh.load_state_dict(plain.state_dict())
    x = rand(2, 6, 9, 9)
    mid_act, act = act_names(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), other(x), rtol=0, atol=0)
        torch.testing.assert_close(fresh(x).double(), plain_forward(plain.double(), x.double(), None, mid_act, act),
                                   **F32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_modules_and_to_reference(variant):
    kwargs = VARIANTS[variant]
    src = make_block(seed=3, **kwargs)
    ref = src.to_reference().eval()
    block = JointBlock.from_modules(ref.depthwise, ref.pointwise, ref.bn, ref.act, ref.mid_bn, ref.mid_act).eval()
    # from_modules shares the modules (not copies); to_reference copies.
    assert block.depthwise is ref.depthwise and block.pointwise.weight is ref.pointwise.weight
    back = block.to_reference().eval()
    assert back.pointwise.weight is not block.pointwise.weight
    assert type(back) is JointBlockReference and type(back.act) is type(ref.act)
    x = rand(2, 6, 11, 9, seed=4)
    with torch.no_grad():
        y_ref, y_block, y_back = ref(x), block(x), back(x)
    torch.testing.assert_close(y_back, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(y_block, y_ref, **F32)


def test_from_modules_with_plain_composition_modules():
    """A model built from plain PyTorch modules converts: outputs unchanged, parameters shared."""
    mods = plain_modules(5, 8, stride=2, dilation=2, mid_norm=True, bias=True, dtype=torch.float32, seed=5).eval()
    block = JointBlock.from_modules(mods["depthwise"], mods["pointwise"], mods["bn"], nn.ReLU6(), mods["mid_bn"],
                                    nn.ReLU()).eval()
    x = rand(3, 5, 10, 7, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain_forward(mods, x, None, "relu", "relu6"), **F32)
        mods["pointwise"].weight.mul_(2.0)  # shared: the block sees the change
        torch.testing.assert_close(block(x), plain_forward(mods, x, None, "relu", "relu6"), **F32)


# -- eval: the fused path -----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_fused_equals_reference(variant, residual, layout):
    block = make_block(seed=7, **VARIANTS[variant]).eval()
    twin = plain_twin(block).eval()
    fmt = FORMATS[layout]
    x = rand(2, 6, 11, 13, seed=8, fmt=fmt)
    with torch.no_grad():
        y_shape = block.to_reference()(x).shape
        res = rand(*y_shape, seed=9, fmt=fmt) if residual else None
        with OpRecorder() as rec:
            y = block(x, res)
        assert rec.count() == 1, "eval forward must be one fused op call"
        mid_act, act = act_names(block)
        expected = plain_forward(twin, x.double(), None if res is None else res.double(), mid_act, act)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=fmt)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), expected, **F32)


def test_eval_under_inference_mode():
    block = make_block(seed=23, mid_norm=True, dilation=2).eval()
    x = rand(2, 6, 9, 9, seed=24, fmt=torch.channels_last)
    with torch.no_grad():
        expected = block(x)
    with torch.inference_mode():
        y = block(x)
        y_again = block(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(y_again, expected, rtol=0, atol=0)


def test_eval_float64_block():
    """.to(torch.float64): the fused op runs in float64 and matches tightly."""
    block = make_block(seed=10, mid_norm=True, activation="relu6", bias=True, dilation=3).to(torch.float64).eval()
    assert all(p.dtype == torch.float64 for p in block.parameters())
    assert all(b.dtype == torch.float64 for b in block.buffers() if b.is_floating_point())
    x = rand(2, 6, 9, 8, seed=11, dtype=torch.float64, fmt=torch.channels_last)
    with torch.no_grad():
        y = block(x)
        expected = plain_forward(plain_twin(block).eval(), x, None, "relu6", "relu6")
    assert y.dtype == torch.float64 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected, **F64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bfloat16"])
def test_eval_low_precision_block(dtype):
    """.half() / .bfloat16() on the CPU: output in that dtype, error against the float64 truth at
    most 2x PyTorch's own error computing the same block in that dtype, plus a small atol."""
    block = make_block(seed=12, mid_norm=True, bias=True, dilation=2).to(dtype).eval()
    truth_mods = plain_twin(block).eval()  # the low-precision parameters, exactly, in float64
    x = rand(2, 6, 10, 10, seed=13, dtype=dtype)
    with torch.no_grad():
        y = block(x)
        truth = plain_forward(truth_mods, x.double(), None, "relu", "relu")
        pytorch_lowp = block.to_reference()(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    err = (y.double() - truth).abs().max().item()
    err_pytorch = (pytorch_lowp.double() - truth).abs().max().item()
    assert err <= 2 * err_pytorch + 1e-3, f"fused error {err:.3g}, PyTorch's own {err_pytorch:.3g}"


# -- training: batch statistics, exactly nn.BatchNorm2d ---------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("mid_norm", [False, True])
def test_training_equals_reference(mid_norm, momentum):
    """Training mode: outputs, running_mean/var (unbiased) and num_batches_tracked match the plain
    composition over several steps; afterwards eval (fused) matches too."""
    block = make_block(seed=14, mid_norm=mid_norm, momentum=momentum, bias=True, dilation=2).double().train()
    twin = plain_twin(block).train()
    mid_act, act = act_names(block)
    for step in range(3):
        x = rand(4, 6, 9, 7, seed=20 + step, dtype=torch.float64)
        res = rand(4, 10, 9, 7, seed=30 + step, dtype=torch.float64)
        with OpRecorder() as rec:
            y = block(x, res)
        assert rec.count() == 0, "training mode must use batch statistics, not the fused inference op"
        torch.testing.assert_close(y, plain_forward(twin, x, res, mid_act, act), **F64)
    for name, buf in twin.named_buffers():
        mine = dict(block.named_buffers())[name]
        if buf.is_floating_point():
            torch.testing.assert_close(mine, buf, **F64)
        else:
            assert torch.equal(mine, buf), name
    assert int(block.bn.num_batches_tracked) == 3 + 3  # randomize_ starts it at 3
    block.eval(), twin.eval()
    x = rand(2, 6, 9, 7, seed=40, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain_forward(twin, x, None, mid_act, act), **F64)


def test_training_gradients_equal_reference():
    block = make_block(seed=15, mid_norm=True, bias=True, stride=2).double().train()
    ref = block.to_reference().train()
    x = rand(3, 6, 8, 9, seed=16, dtype=torch.float64)
    for m in (block, ref):
        m.zero_grad()
        m(x).square().sum().backward()
    for (name, p), q in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **F64, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_without_affine(mode):
    mods = plain_modules(6, 10, mid_norm=True, affine=False, dilation=2, seed=17)
    block = JointBlock.from_modules(mods["depthwise"], mods["pointwise"], mods["bn"], nn.ReLU(), mods["mid_bn"],
                                    nn.ReLU6())
    twin = copy.deepcopy(mods)
    block.train(mode == "train"), twin.train(mode == "train")
    x = rand(2, 6, 7, 7, seed=18, dtype=torch.float64)
    with torch.no_grad(), OpRecorder() as rec:
        y = block(x)
    assert rec.count() == (1 if mode == "eval" else 0)
    torch.testing.assert_close(y, plain_forward(twin, x, None, "relu6", "relu"), **F64)
    for name, buf in twin.named_buffers():
        torch.testing.assert_close(dict(block.named_buffers())[name].double(), buf.double(), **F64)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_without_running_stats(mode):
    """track_running_stats=False: batch statistics in eval too (so never the fused path)."""
    mods = plain_modules(6, 10, track_running_stats=False, seed=19)
    block = JointBlock.from_modules(mods["depthwise"], mods["pointwise"], mods["bn"], nn.ReLU())
    twin = copy.deepcopy(mods)
    block.train(mode == "train"), twin.train(mode == "train")
    x = rand(3, 6, 7, 5, seed=20, dtype=torch.float64)
    with torch.no_grad(), OpRecorder() as rec:
        y = block(x)
    assert rec.count() == 0
    torch.testing.assert_close(y, plain_forward(twin, x, None, "none", "relu"), **F64)


# -- module plumbing --------------------------------------------------------------------------------------------
def test_hooks():
    """Forward pre-hooks and hooks on the block, full backward hooks and parameter gradient hooks
    work with the fused eval path."""
    block = make_block(seed=21, dilation=2).eval()
    twin = copy.deepcopy(block)
    seen = {}

    def record(key, value):  # hooks returning None leave outputs/gradients unchanged
        seen[key] = value.detach().clone()

    block.register_forward_pre_hook(lambda m, args: (args[0] * 2.0,))
    block.register_forward_hook(lambda m, args, out: record("out", out))
    block.register_full_backward_hook(lambda m, gin, gout: record("gin", gin[0]))
    block.pointwise.weight.register_hook(lambda g: record("gw", g))
    x = rand(2, 6, 7, 7, seed=22).requires_grad_()
    y = block(x)
    y.sum().backward()
    x2 = (x.detach() * 2.0).requires_grad_()
    y_twin = twin(x2)
    y_twin.sum().backward()
    torch.testing.assert_close(y, y_twin, rtol=0, atol=0)
    torch.testing.assert_close(seen["out"], y_twin.detach(), rtol=0, atol=0)
    torch.testing.assert_close(seen["gw"], twin.pointwise.weight.grad, **F32)
    torch.testing.assert_close(seen["gin"], x2.grad, **F32)  # grad w.r.t. the hooked (doubled) input


def test_module_api():
    block = JointBlock(4, 8, stride=2, dilation=3, dtype=torch.float64)
    assert block.depthwise.groups == 4 and block.depthwise.dilation == (3, 3) and block.depthwise.padding == (3, 3)
    assert block.depthwise.stride == (2, 2) and block.pointwise.kernel_size == (1, 1)
    assert block.pointwise.weight.dtype == torch.float64 and block.mid_bn is None
    assert isinstance(block.act, nn.ReLU) and isinstance(block.mid_act, nn.Identity)
    mn = JointBlock(4, 8, mid_norm=True, activation="relu6")
    assert isinstance(mn.mid_bn, nn.BatchNorm2d) and isinstance(mn.mid_act, nn.ReLU6)
    assert "fused" in repr(block)
    assert sum(p.numel() for p in block.parameters()) == 4 * 9 + 4 * 8 + 2 * 8


# -- constructor and conversion errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(in_channels=0), "in_channels must be a positive int"),
    (dict(out_channels=-1), "out_channels must be a positive int"),
    (dict(stride=0), "stride must be a positive int"),
    (dict(dilation=0), "dilation must be a positive int"),
    (dict(kernel_size=0), "kernel_size must be a positive int"),
    (dict(stride=1.5), "stride must be a positive int"),
    (dict(padding=-1), "padding must be a non-negative int or None"),
    (dict(padding="same"), "padding must be a non-negative int or None"),
    (dict(activation="gelu"), "activation must be one of"),
    (dict(mid_norm=True, mid_activation="swish"), "activation must be one of"),
    (dict(activation=nn.GELU()), "unsupported activation module GELU"),
])
def test_constructor_errors(kwargs, message):
    args = dict(in_channels=4, out_channels=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        JointBlock(**args)


def _mods(**changes):
    mods = dict(depthwise=nn.Conv2d(4, 4, 3, padding=1, groups=4), pointwise=nn.Conv2d(4, 8, 1),
                bn=nn.BatchNorm2d(8), act=nn.ReLU(), mid_bn=None, mid_act=None)
    mods.update(changes)
    return mods


@pytest.mark.parametrize("changes,message", [
    (dict(depthwise=nn.Conv2d(4, 4, 3, padding=1)), "depthwise must be an nn.Conv2d with groups == in_channels"),
    (dict(depthwise=nn.Conv2d(4, 8, 3, padding=1, groups=4)), "groups == in_channels == out_channels"),
    (dict(depthwise=nn.Conv2d(4, 4, 3, padding="same", groups=4)), "explicit zero padding"),
    (dict(depthwise=nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect")), "explicit zero padding"),
    (dict(pointwise=nn.Conv2d(4, 8, 3)), "pointwise must be a 1x1 nn.Conv2d"),
    (dict(pointwise=nn.Conv2d(4, 8, 1, stride=2)), "pointwise must be a 1x1 nn.Conv2d with stride 1"),
    (dict(pointwise=nn.Conv2d(5, 8, 1)), "pointwise expects 5 channels, depthwise gives 4"),
    (dict(bn=nn.BatchNorm2d(7)), "bn must be an nn.BatchNorm2d over 8 channels"),
    (dict(bn=nn.BatchNorm1d(8)), "bn must be an nn.BatchNorm2d over 8 channels"),
    (dict(mid_bn=nn.BatchNorm2d(8)), "mid_bn must be an nn.BatchNorm2d over 4 channels"),
    (dict(act=nn.GELU()), "unsupported activation module GELU"),
    (dict(mid_act=nn.Mish()), "unsupported activation module Mish"),  # SiLU is supported now
])
def test_from_modules_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        JointBlock.from_modules(**_mods(**changes))


def test_wrong_input_through_the_block():
    block = JointBlock(4, 8).eval()
    with pytest.raises(ValueError, match=r"dw_weight must have shape \[C_in=3"):
        block(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        block(torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4))
