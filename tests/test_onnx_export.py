"""ONNX export: models with JointBlocks, and modules calling torch.ops.lwkernels.joint_block
directly, through both torch.onnx exporters, run in ONNX Runtime with the outputs PyTorch gives.
torch.export keeps the op as one node."""
from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import nn

from helpers import randomize_
import lwkernels
from lwkernels import JointBlock

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

EXPORTERS = ("dynamo", "torchscript")

# A fused module's checks must not touch a traced tensor's values or sizes: the tracer would warn
# that the trace might be wrong (it is not, but a user exporting a model cannot tell).
pytestmark = pytest.mark.filterwarnings("error::torch.jit.TracerWarning")


def _export(model: nn.Module, inputs, exporter: str, **kwargs) -> bytes:
    names = [f"in{i}" for i in range(len(inputs))]
    if exporter == "dynamo":
        program = torch.onnx.export(model, tuple(inputs), dynamo=True, input_names=names, verbose=False, **kwargs)
        return program.model_proto.SerializeToString()
    f = io.BytesIO()
    torch.onnx.export(model, tuple(inputs), f, dynamo=False, input_names=names, **kwargs)
    return f.getvalue()


def _run_ort(data: bytes, inputs):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[int(i.name[2:])].numpy() for i in session.get_inputs()}
    return torch.from_numpy(session.run(None, feeds)[0])


def _assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    """The acceptance rule: max |difference| / max |output| <= 1e-5."""
    assert got.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((got - expected).abs().max() / scale).item()
    assert err <= 1e-5, f"relative max error {err:.2e}"


def _op_nodes(data: bytes):
    return [n.op_type for n in onnx.load_from_string(data).graph.node]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("mid_norm,residual,act", list(itertools.product([False, True], [False, True],
                                                                         ["relu", "relu6", "none", "hardswish",
                                                                          "silu"])))
def test_joint_block_exports(exporter, mid_norm, residual, act, single_thread):
    block = randomize_(JointBlock(5, 7, stride=2, dilation=2, mid_norm=mid_norm, bias=True,
                                  activation=None if act == "none" else act), seed=3).eval()
    x = torch.randn(2, 5, 11, 9)
    inputs = [x, torch.randn(2, 7, 6, 5)] if residual else [x]
    with torch.no_grad():
        expected = block(*inputs)
    data = _export(block, inputs, exporter)
    assert not any("lwkernels" in op for op in _op_nodes(data)), "the exported graph must use standard ops only"
    _assert_same(_run_ort(data, inputs), expected)


class CallsTheOp(nn.Module):
    """A user's module that calls the op itself, with every optional operand present."""

    def __init__(self, mid_act: str, out_act: str):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.dw = nn.Parameter(torch.randn(6, 1, 3, 3, generator=g))
        self.dw_scale = nn.Parameter(torch.rand(6, generator=g) + 0.5)
        self.dw_shift = nn.Parameter(torch.randn(6, generator=g))
        self.pw = nn.Parameter(torch.randn(4, 6, 1, 1, generator=g))
        self.pw_scale = nn.Parameter(torch.rand(4, generator=g) + 0.5)
        self.pw_shift = nn.Parameter(torch.randn(4, generator=g))
        self.acts = (mid_act, out_act)

    def forward(self, x, residual):
        return torch.ops.lwkernels.joint_block(x, self.dw, self.dw_scale, self.dw_shift, self.acts[0], self.pw,
                                               self.pw_scale, self.pw_shift, residual, self.acts[1], [1, 1], [3, 3],
                                               [3, 3])


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("acts", [("relu", "relu6"), ("relu6", "none"), ("none", "relu"), ("hardswish", "silu"),
                                  ("silu", "hardswish")], ids=str)
def test_direct_op_call_exports(exporter, acts, single_thread):
    model = CallsTheOp(*acts).eval()
    inputs = [torch.randn(1, 6, 10, 12), torch.randn(1, 4, 10, 12)]
    with torch.no_grad():
        expected = model(*inputs)
    kwargs = {"custom_translation_table": lwkernels.onnx_translation_table()} if exporter == "dynamo" else {}
    data = _export(model, inputs, exporter, **kwargs)
    assert {"Conv", "Add"} <= set(_op_nodes(data))
    _assert_same(_run_ort(data, inputs), expected)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_fused_model_exports(exporter, single_thread):
    from lwkernels.models import MobileNetV1

    model = randomize_(MobileNetV1(num_classes=10, width_mult=0.25), seed=1).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    _assert_same(_run_ort(_export(model, [x], exporter), [x]), expected)


def test_torch_export_keeps_the_op_as_one_node():
    block = randomize_(JointBlock(4, 6, dilation=2), seed=0).eval()
    program = torch.export.export(block, (torch.randn(1, 4, 8, 8),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("lwkernels.joint_block.default") == 1, targets
    assert not any("convolution" in t for t in targets), targets


class CallsTheInvertedResidualOp(nn.Module):
    """lwkernels::inverted_residual called directly (dilated, with a residual)."""

    def __init__(self, acts):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        self.ew, self.es, self.eb = nn.Parameter(r(24, 4, 1, 1)), nn.Parameter(r(24).abs() + .5), nn.Parameter(r(24))
        self.dw, self.ds, self.db = nn.Parameter(r(24, 1, 3, 3)), nn.Parameter(r(24).abs() + .5), nn.Parameter(r(24))
        self.pw, self.ps, self.pb = nn.Parameter(r(4, 24, 1, 1)), nn.Parameter(r(4).abs() + .5), nn.Parameter(r(4))
        self.acts = acts

    def forward(self, x):
        return torch.ops.lwkernels.inverted_residual(
            x, self.ew, self.es, self.eb, self.acts[0], self.dw, self.ds, self.db, self.acts[1], self.pw, self.ps,
            self.pb, x, self.acts[2], [1, 1], [2, 2], [2, 2])


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("acts", [("relu6", "relu6", "none"), ("hardswish", "silu", "relu")], ids=str)
def test_inverted_residual_op_and_module_export(exporter, acts, single_thread):
    x = torch.randn(1, 4, 10, 12)
    model = CallsTheInvertedResidualOp(acts).eval()
    with torch.no_grad():
        expected = model(x)
    kwargs = {"custom_translation_table": lwkernels.onnx_translation_table()} if exporter == "dynamo" else {}
    data = _export(model, [x], exporter, **kwargs)
    assert {"Conv", "Add"} <= set(_op_nodes(data))
    _assert_same(_run_ort(data, [x]), expected)
    module = randomize_(lwkernels.InvertedResidual(4, 4, 6, dilation=2, activation=acts[0]), seed=5).eval()
    with torch.no_grad():
        expected = module(x)
    _assert_same(_run_ort(_export(module, [x], exporter), [x]), expected)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_replaying_layout_sequential_exports_its_members(exporter, single_thread):
    """fuse()'s container, once eager calls have prepared its replay as one native call: an export
    must still see the members' ops (both exporters trace with torch.jit or torch.export, which the
    container checks), and the exported model computes what the container does."""
    from lwkernels.nn.layout_sequential import LayoutSequential

    members = [lwkernels.ConvBNAct(3, 16, 3, stride=2)]
    members += [JointBlock(16 if i == 0 else 24, 24) for i in range(4)]  # (a channels-last run)
    members += [lwkernels.InvertedResidual(24, 24, 4)]
    seq = randomize_(LayoutSequential(*members), seed=7).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for _ in range(3):
            expected = seq(x)
    (plan,) = seq.__dict__["_layout_plans"].values()
    assert plan.replay is not None and plan.replay._native  # (the export below starts from a replay)
    with torch.no_grad():  # (as a deployment script exports; with grad on no replay would run anyway)
        data = _export(seq, [x], exporter)
        other = torch.randn(1, 3, 32, 32)  # (a graph that recorded no ops would return x's output)
        expected_other = seq(other)
    assert "Conv" in set(_op_nodes(data))
    _assert_same(_run_ort(data, [x]), expected)
    _assert_same(_run_ort(data, [other]), expected_other)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_fused_classifier_forward_exports_its_class_forward(exporter, single_thread):
    """A model fuse() gave a ClassifierForward (its body and head replaying as one native call)
    exports what its class's forward does: the body's ops, pooling and the linear layer."""
    from test_classifier_forward import TinyMnas, _model
    from lwkernels.nn.classifier_forward import installed

    model, _ = lwkernels.fuse(_model(TinyMnas))
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        for _ in range(3):
            expected = model(x)
    assert installed(model).plans()  # (the export below starts from a replay)
    with torch.no_grad():
        data = _export(model, [x], exporter)
        other = torch.randn(1, 3, 48, 48)
        expected_other = model(other)
    assert {"Conv", "Gemm"} <= set(_op_nodes(data)) or {"Conv", "MatMul"} <= set(_op_nodes(data))
    _assert_same(_run_ort(data, [x]), expected)
    _assert_same(_run_ort(data, [other]), expected_other)
