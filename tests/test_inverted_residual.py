"""InvertedResidual (lwkernels/nn/inverted_residual.py, cpu/prepared_inverted_residual.py,
csrc/inverted_residual.h): expand ConvBNAct + JointBlock (+ skip) as one native call. It agrees with
the plain composition on a grid of awkward shapes on every CPU path, in both layouts and dtypes,
really runs the fused call, passes NaN/Inf like the plain modules, falls back where it must, and
names the problem in construction errors."""
import math

import pytest
import torch

from lwkernels import InvertedResidual, JointBlock, inverted_residual, inverted_residual_reference, to_reference
from lwkernels.cpu.prepared_inverted_residual import PreparedInvertedResidual
from helpers import cpu_paths_here, forced_isa, randomize_, tolerance


@pytest.fixture
def replays(monkeypatch):
    count = {"n": 0}
    run = PreparedInvertedResidual.run

    def counting(self, x, residual):
        count["n"] += 1
        return run(self, x, residual)

    monkeypatch.setattr(PreparedInvertedResidual, "run", counting)
    return count


def _x(*shape, seed=1, dtype=torch.float32, channels_last=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _check(m, x, residual=None):
    """m(x) twice (the second call replays the fused call) equals the plain composition in float64."""
    with torch.no_grad():
        m(x, residual)
        y = m(x, residual)
        ref = to_reference(m).double()(x.double(), None if residual is None else residual.double())
    k = m[1].depthwise.kernel_size
    rtol, atol = tolerance(x.dtype, m[0][0].in_channels + k[0] * k[1] + m[1].pointwise.in_channels)
    assert y.shape == ref.shape and y.dtype == x.dtype
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol, equal_nan=True)
    return y


# (C_in, C_out, expand ratio, kernel, stride, dilation, H, W): MobileNetV2's shapes and awkward ones
# (channels off every vector width, 1x1 and narrow images, 5x5, stride 3, DeepLab-style dilation).
GRID = [
    (16, 16, 6, 3, 1, 1, 14, 14), (24, 32, 6, 3, 2, 1, 28, 28), (32, 32, 6, 3, 1, 1, 28, 28),
    (160, 160, 6, 3, 1, 1, 7, 7), (3, 5, 2, 3, 1, 1, 9, 11), (5, 7, 3, 5, 1, 1, 13, 6), (8, 8, 4, 3, 1, 2, 15, 15),
    (4, 4, 6, 3, 1, 4, 12, 9), (2, 3, 3, 3, 1, 1, 1, 1), (6, 6, 1, 3, 3, 1, 20, 17), (24, 24, 6, 3, 1, 1, 56, 56),
]


@pytest.mark.parametrize("isa", cpu_paths_here())
@pytest.mark.parametrize("shape", GRID)
def test_matches_plain_composition(replays, isa, shape):
    cin, cout, t, k, s, d, h, w = shape
    v = GRID.index(shape)
    acts = ["relu6", "hardswish", "silu", "relu"]
    m = randomize_(InvertedResidual(cin, cout, t, stride=s, dilation=d, kernel_size=k, activation=acts[v % 4]),
                   seed=v).eval()
    with forced_isa(isa):
        for dtype in (torch.float32, torch.float64):
            for cl in (False, True):
                _check(m.to(dtype), _x(1 + v % 3, cin, h, w, seed=v, dtype=dtype, channels_last=cl))
    # Each call after the first of a signature replays the fused call (a 1x1 image's channels_last
    # tensor is also contiguous: the same signature as the NCHW one before it).
    assert replays["n"] == (6 if h == w == 1 else 4)


@pytest.mark.parametrize("size,kernel,transposes", [(7, 3, True), (14, 5, True), (14, 3, False), (9, 3, False)])
def test_small_nchw_images_run_channels_last_inside(replays, size, kernel, transposes):
    """NCHW calls with a 7x7 output (14x14 for a 5x5 depthwise) run the NHWC kernels on transposed
    copies; the result is NCHW and equal to the plain composition either way."""
    m = randomize_(InvertedResidual(16, 16, 6, kernel_size=kernel), seed=12).eval()
    x = _x(2, 16, size, size)
    y = _check(m, x)
    assert m.__dict__["_prepared"].transposes == transposes and y.is_contiguous()
    _check(m, x.contiguous(memory_format=torch.channels_last))  # channels_last input: no transposing
    assert not m.__dict__["_prepared"].transposes and replays["n"] == 2


@pytest.mark.parametrize("nan_weight", [False, True], ids=["finite", "nan_weight"])
@pytest.mark.parametrize("size,kernel", [(7, 3), (14, 5), (14, 3)])  # transposed NHWC, transposed, NCHW
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_replay_folds_the_depthwise_weights_once(replays, size, kernel, dtype, channels_last, nan_weight):
    """The replay passes the depthwise weights folded once, for the layout its kernels run in
    (dw_folded); the same native call folding them itself gives the identical output (a NaN weight's
    channel reaches every output through the project conv: NaN everywhere, in both)."""
    m = randomize_(InvertedResidual(16, 16, 6, kernel_size=kernel), seed=5).eval().to(dtype)
    if nan_weight:
        with torch.no_grad():
            m[1].depthwise.weight[7, 0, 1, 1] = float("nan")
    x = _x(2, 16, size, size, dtype=dtype, channels_last=channels_last)
    with torch.no_grad():
        m(x)
        y = m(x)
    assert replays["n"] == 1
    call = m.__dict__["_prepared"]
    packed, e_scale, e_shift = call._expand_operands
    a, acts = call._block_call.addresses, call._acts
    unfolded = torch.empty_like(y)
    call._C.inverted_residual_forward(packed, call._project, call._geometry, x.data_ptr(), e_scale, e_shift, acts[0],
                                      a[0], a[1], a[2], acts[1], a[3], a[4], x.data_ptr(), acts[2],  # (skip: x)
                                      unfolded.data_ptr(), torch.get_num_threads(), dw_folded=False)
    if nan_weight:
        assert torch.isnan(y).all() and torch.isnan(unfolded).all()
    else:
        assert torch.equal(y, unfolded)


def test_explicit_residual_and_threads(replays):
    m = randomize_(InvertedResidual(8, 12, 6, skip=False), seed=3).eval()
    x, r = _x(2, 8, 10, 10), _x(2, 12, 10, 10, seed=2)
    before = torch.get_num_threads()
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            _check(m, x, r)
        finally:
            torch.set_num_threads(before)
    assert replays["n"] == 5  # every call but the first (the thread count is read per call)


def test_nan_and_inf_inputs_match_the_plain_composition():
    m, x = randomize_(InvertedResidual(8, 8, 6), seed=4).eval(), _x(1, 8, 12, 12)
    x[0, 1, 3, 4] = float("nan")
    x[0, 2, 7, 7] = float("inf")
    y = _check(m, x)
    with torch.no_grad():
        ref = to_reference(m)(x)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y).any()


def test_replay_sees_weight_changes_and_hooks(replays):
    m, x = randomize_(InvertedResidual(8, 8, 6), seed=5).eval(), _x(1, 8, 9, 9)
    _check(m, x)
    with torch.no_grad():
        m[0][0].weight.mul_(0.5)  # the expand weights
        m[1].depthwise.weight.add_(0.1)
    _check(m, x)
    assert replays["n"] == 2
    calls = []
    handle = m[1].register_forward_hook(lambda *a: calls.append(1))
    _check(m, x)  # a hook on the block: the two modules run, the hook is called
    handle.remove()
    assert replays["n"] == 2 and calls


def test_training_and_autograd_run_the_modules(replays):
    m = randomize_(InvertedResidual(8, 8, 6), seed=6)
    x = _x(2, 8, 8, 8).requires_grad_()
    m.train()
    y = m(x)
    y.sum().backward()
    assert x.grad is not None and m[0][0].weight.grad is not None
    m.eval()
    y = m(x)
    torch.testing.assert_close(y, to_reference(m)(x), rtol=1e-4, atol=1e-5)
    assert replays["n"] == 0


def test_state_dict_matches_reference_and_from_modules_shares():
    m = randomize_(InvertedResidual(8, 16, 6, stride=2), seed=7).eval()
    ref = to_reference(m)
    assert list(m.state_dict()) == list(ref.state_dict())
    again = InvertedResidual.from_modules(m[0], m[1])
    assert again[0] is m[0] and again[1] is m[1] and not again.skip


def test_construction_errors_name_the_problem():
    m = InvertedResidual(8, 8, 6)
    with pytest.raises(ValueError, match="block takes 24 channels, the expand conv gives 48"):
        InvertedResidual.from_modules(m[0], JointBlock(24, 8))
    with pytest.raises(ValueError, match="skip needs stride 1"):
        InvertedResidual(8, 8, 6, stride=2, skip=True)
    with pytest.raises(ValueError, match="expand_ratio must be a positive int"):
        InvertedResidual(8, 8, 0)
    with pytest.raises(ValueError, match="expand must be a ConvBNAct"):
        InvertedResidual.from_modules(torch.nn.Conv2d(8, 48, 1), m[1])


# -- the op: torch.ops.lwkernels.inverted_residual ---------------------------------------------------

def _op_args(dtype=torch.float32, channels_last=False, residual=True, acts=("hardswish", "relu6", "silu"), seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    x = r(2, 4, 7, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return [x, r(10, 4, 1, 1), r(10).abs() + 0.5, r(10), acts[0], r(10, 1, 3, 3), r(10).abs() + 0.5, r(10), acts[1],
            r(4, 10, 1, 1), r(4).abs() + 0.5, r(4), r(2, 4, 7, 6) if residual else None, acts[2], [1, 1], [1, 1], [1, 1]]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_op_matches_reference_and_passes_opcheck(channels_last, residual):
    args = _op_args(channels_last=channels_last, residual=residual)
    y = inverted_residual(*args)
    torch.testing.assert_close(y, inverted_residual_reference(*args), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.library.opcheck(inverted_residual, args)


def test_op_gradients():
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in _op_args(torch.float64)]
    assert torch.autograd.gradcheck(lambda *t: inverted_residual(*t), args, atol=1e-6)


def test_op_errors_name_the_problem():
    args = _op_args()
    bad = list(args)
    bad[1] = torch.randn(10, 5, 1, 1)
    with pytest.raises(ValueError, match=r"expand_weight must have shape \[C_exp, C_in=4, 1, 1\]"):
        inverted_residual(*bad)
    bad = list(args)
    bad[5] = torch.randn(8, 1, 3, 3)
    with pytest.raises(ValueError, match="expanded channels"):
        inverted_residual(*bad)
    bad = list(args)
    bad[4] = "gelu"
    with pytest.raises(ValueError, match="expand_act must be one of"):
        inverted_residual(*bad)
    bad = list(args)
    bad[2] = torch.ones(10, dtype=torch.float64)
    with pytest.raises(TypeError, match="expand_scale has dtype torch.float64"):
        inverted_residual(*bad)


def test_module_under_autograd_compile_and_export(replays):
    m = randomize_(InvertedResidual(8, 8, 6), seed=8).eval()
    x = _x(2, 8, 10, 10)
    with torch.no_grad():
        expected = to_reference(m)(x)
    # Autograd with eval-mode BatchNorm: the op and its backward.
    xg = x.clone().requires_grad_()
    y = m(xg)
    y.sum().backward()
    ref_x = x.clone().requires_grad_()
    to_reference(m)(ref_x).sum().backward()
    torch.testing.assert_close(y.detach(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xg.grad, ref_x.grad, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        compiled = torch.compile(m, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
        exported = torch.export.export(m, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert any("lwkernels.inverted_residual" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(x), expected, rtol=1e-4, atol=1e-5)
    assert replays["n"] == 0


def test_onnx_export_runs_the_plain_composition(tmp_path):
    onnx = pytest.importorskip("onnx")
    m = randomize_(InvertedResidual(8, 8, 6), seed=9).eval()
    x = _x(1, 8, 10, 10)
    path = tmp_path / "ir.onnx"
    torch.onnx.export(m, (x,), str(path), dynamo=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and "Add" in ops and not any("inverted" in o.lower() for o in ops), ops
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(y, m(x), rtol=1e-4, atol=1e-5)


# -- non-finite values: the same positions as the plain composition ---------------------------------

#: (what is poisoned, value): the input, the residual, and one element of each weight / BN parameter.
POISONS = (("x", float("nan")), ("x", float("inf")), ("x", float("-inf")), ("residual", float("nan")),
           ("0.0.weight", float("nan")), ("0.1.weight", float("nan")), ("0.1.bias", float("nan")),
           ("0.1.running_mean", float("nan")), ("0.1.running_var", float("nan")),
           ("1.depthwise.weight", float("nan")), ("1.mid_bn.running_var", float("nan")),
           ("1.pointwise.weight", float("nan")), ("1.bn.bias", float("nan")))


@pytest.mark.parametrize("poison", POISONS, ids=lambda p: f"{p[0]}={p[1]}")
@pytest.mark.parametrize("grad", [False, True], ids=["replayed", "op"])
def test_non_finite_values_propagate_as_in_the_plain_composition(cpu_isa, poison, grad, single_thread):
    what, value = poison
    # (relu6 would clip an infinite input to a finite value: silu lets it through)
    act = "silu" if math.isinf(value) else "relu6"
    m = randomize_(InvertedResidual(5, 6, 4, dilation=2, activation=act, skip=False), seed=11).eval()
    x, r = _x(2, 5, 7, 9, seed=12), _x(2, 6, 7, 9, seed=13)
    if what == "x":
        x[1, 2, 3, 4] = value
    elif what == "residual":
        r[0, 1, 0, 8] = value
    else:
        with torch.no_grad():
            tensor = m.get_buffer(what) if "running" in what else m.get_parameter(what)
            tensor.view(-1)[1] = value
    with torch.no_grad():
        ref = to_reference(m).double()(x.double(), r.double())
    assert not torch.isfinite(ref).all(), "the poison must reach the reference's output"
    with torch.set_grad_enabled(grad):
        m(x, r)
        y = m(x, r).detach()
    same = (torch.isnan(y) == torch.isnan(ref)) & (torch.isposinf(y) == torch.isposinf(ref)) & \
        (torch.isneginf(y) == torch.isneginf(ref))
    assert same.all(), f"non-finite positions differ at {(~same).nonzero()[:5].tolist()}"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y.double()[finite], ref[finite], rtol=1e-4, atol=1e-4)
