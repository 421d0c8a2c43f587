"""torch.ops.lwkernels.joint_block on the CPU against the float64 reference, on every CPU path this
machine has (LWKERNELS_CPU_ISA), over the grid of docs/testing.md, The awkward-shape grid.

Outputs the backend allocates are pre-filled with NaN (fixture `nan_outputs`), and every input is
random and nonzero, so a skipped, zero-filled or stale tile cannot match the reference."""
from __future__ import annotations

import gc
import itertools
import os
import threading

import numpy as np
import pytest
import torch
from torch import nn

import lwkernels
import lwkernels.ops.contract as contract
import lwkernels.cpu.backend as cpu_backend
from helpers import (ACTIVATIONS, Case, assert_matches_reference, call_op, make_args, reference64,
                     randomize_)

pytestmark = pytest.mark.usefixtures("nan_outputs")

LAYOUTS = ("nchw", "nhwc")
OTHER_LAYOUT = {"nchw": "nhwc", "nhwc": "nchw"}


def check(case: Case, seed: int = 0) -> torch.Tensor:
    args = make_args(case, seed)
    y = call_op(args)
    assert_matches_reference(y, args, accumulation_length=case.accumulation_length)
    return y


# -- geometry ----------------------------------------------------------------------------------------
GEOMETRY = [(k, d, s) for k in (1, 3, 5) for d in (1, 2, 3, 5) for s in (1, 2)]
# (n, c_in, c_out, h, w): odd sizes, and a tiny input smaller than every dilated kernel (d >= 2).
SIZES = [(2, 5, 17, 7, 9), (1, 3, 4, 3, 2)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "n{}c{}-{} {}x{}".format(*s))
@pytest.mark.parametrize("k,dilation,stride", GEOMETRY)
def test_geometry_default_padding(cpu_isa, k, dilation, stride, size, layout):
    n, c_in, c_out, h, w = size
    check(Case(n=n, c_in=c_in, c_out=c_out, h=h, w=w, kernel=k, stride=stride, dilation=dilation,
               mid_act="relu", out_act="none", residual=layout, layout=layout))


ASYMMETRIC = [  # kernel, stride, padding, dilation, h, w
    ((3, 5), (1, 2), (1, 0), (2, 1), 9, 11),
    ((5, 3), (2, 1), (0, 3), (1, 3), 11, 6),
    ((1, 3), (2, 2), (0, 5), (1, 5), 6, 5),    # W smaller than the dilated kernel, padding makes it legal
    ((3, 3), (1, 1), (0, 0), (1, 1), 5, 5),    # no padding ("valid")
    ((3, 3), (2, 1), (4, 2), (1, 1), 7, 4),    # more padding than the default: border-only outputs
    ((5, 5), (1, 1), (6, 0), (3, 1), 5, 5),    # output width 1
    ((3, 3), (2, 2), (2, 2), (2, 2), 1, 1),    # 1x1 input
    ((3, 1), (1, 2), (3, 0), (3, 1), 2, 13),
    ((2, 4), (1, 1), (0, 1), (1, 2), 6, 7),    # even kernel sizes
    ((3, 3), (3, 3), (1, 1), (1, 1), 10, 11),  # stride 3
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geometry", ASYMMETRIC, ids=lambda g: "k{}s{}p{}d{}-{}x{}".format(*g).replace(" ", ""))
def test_geometry_asymmetric_explicit_padding(cpu_isa, geometry, layout):
    kernel, stride, padding, dilation, h, w = geometry
    case = Case(n=2, c_in=6, c_out=9, h=h, w=w, kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                mid_act="relu6", out_act="relu", residual=OTHER_LAYOUT[layout], layout=layout)
    assert min(case.out_shape) >= 1, "test bug: illegal geometry"
    check(case)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c_out", [1, 3, 17, 32, 70])
@pytest.mark.parametrize("c_in", [1, 3, 17, 32, 40])
def test_channel_counts(cpu_isa, c_in, c_out, layout):
    check(Case(n=2, c_in=c_in, c_out=c_out, h=5, w=11, dilation=2, mid_act="none", out_act="relu",
               residual=layout, layout=layout))


# -- options -------------------------------------------------------------------------------------------
AFFINE = {"all": (True, True, True, True), "none": (False, False, False, False),
          "scales": (True, False, True, False), "shifts": (False, True, False, True)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual", [None, "same", "other"], ids=lambda r: f"res-{r}")
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("mid_act,out_act", list(itertools.product(ACTIVATIONS, repeat=2)))
def test_activations_affine_residual(cpu_isa, mid_act, out_act, affine, residual, layout):
    dw_scale, dw_shift, pw_scale, pw_shift = AFFINE[affine]
    res_layout = {None: None, "same": layout, "other": OTHER_LAYOUT[layout]}[residual]
    check(Case(n=2, c_in=17, c_out=24, h=6, w=7, stride=1, dilation=3, mid_act=mid_act, out_act=out_act,
               dw_scale=dw_scale, dw_shift=dw_shift, pw_scale=pw_scale, pw_shift=pw_shift,
               residual=res_layout, layout=layout))


def test_option_grid_reaches_both_sides_of_relu6():
    """Inputs of the grid above make relu6 clip at 0 and 6 (else relu6 == relu would pass)."""
    ref = reference64(make_args(Case(n=2, c_in=17, c_out=24, h=6, w=7, dilation=3, mid_act="none",
                                     out_act="relu6", residual="nchw")))
    assert (ref == 6).any() and (ref == 0).any() and ((ref > 0) & (ref < 6)).any()


# -- memory layouts, batch sizes, dtypes ----------------------------------------------------------------
@pytest.mark.parametrize("residual", [None, "nchw", "nhwc"], ids=lambda r: f"res-{r}")
@pytest.mark.parametrize("layout", ["sliced", "permuted", "sliced_nhwc", "expanded"])
def test_noncontiguous_inputs(cpu_isa, layout, residual):
    case = Case(n=2, c_in=7, c_out=10, h=9, w=5, stride=2, dilation=2, mid_act="relu", out_act="relu",
                residual=residual, layout=layout)
    x = make_args(case)[0]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    check(case)


def test_noncontiguous_weights_and_vectors(cpu_isa):
    """Weights and vectors that are views (transposed, strided) give the same result as dense ones."""
    case = Case(n=2, c_in=6, c_out=8, h=7, w=7, dilation=2, mid_act="relu", out_act="relu6", residual="nchw")
    args = make_args(case, seed=3)
    x, dw, dw_scale, dw_shift, mid_act, pw, pw_scale, pw_shift, residual, out_act, s, p, d = args
    dw_t = dw.transpose(2, 3).contiguous().transpose(2, 3)           # [C, 1, k, k], column-major taps
    pw_t = pw.reshape(8, 6).t().contiguous().t().reshape(8, 6, 1, 1)  # [C_out, C_in] column-major
    assert not dw_t.is_contiguous() and not pw_t.is_contiguous()

    def strided(v):
        big = torch.zeros(2 * v.numel(), dtype=v.dtype)
        big[::2] = v
        return big[::2]

    views = [x, dw_t, strided(dw_scale), strided(dw_shift), mid_act, pw_t, strided(pw_scale), strided(pw_shift),
             residual, out_act, s, p, d]
    assert_matches_reference(call_op(views), args)


@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_batch_sizes(cpu_isa, n, layout, residual):
    case = Case(n=n, c_in=4, c_out=6, h=5, w=6, dilation=2, stride=2, residual=layout if residual else None,
                layout=layout)
    y = check(case)
    assert tuple(y.shape) == case.out_shape


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sliced", "sliced_nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 9, 1, 1), (1, 17, 33, 11, 10, 2, 3)],
                         ids=lambda s: "n{}c{}-{} {}x{} s{}d{}".format(*s))
def test_dtypes(cpu_isa, shape, dtype, layout):
    """float32/float64 natively; float16/bfloat16 computed in float32 and rounded once (tolerance:
    one rounding of the output dtype plus the float32 error)."""
    n, c_in, c_out, h, w, s, d = shape
    check(Case(n=n, c_in=c_in, c_out=c_out, h=h, w=w, stride=s, dilation=d, mid_act="relu6", out_act="none",
               residual="nhwc", layout=layout, dtype=dtype))


# -- threads, bigger shapes --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_thread_counts(cpu_isa, num_threads, parallel_backend, stride, layout):
    assert torch.get_num_threads() == num_threads
    check(Case(n=2, c_in=32, c_out=48, h=15, w=17, stride=stride, dilation=2, mid_act="relu", out_act="relu",
               residual=layout, layout=layout))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(32, 64, 1, 56, 3), (128, 256, 2, 28, 3), (67, 45, 2, 31, 2)],
                         ids=lambda s: "{}->{} s{} {} d{}".format(*s))
def test_large_shapes(cpu_isa, shape, layout):
    c_in, c_out, stride, size, dilation = shape
    check(Case(n=1, c_in=c_in, c_out=c_out, h=size, w=size, stride=stride, dilation=dilation, mid_act="none",
               out_act="relu", residual=layout, layout=layout))


def test_concurrent_calls_from_python_threads(cpu_isa, parallel_backend):
    """4 Python threads x 20 calls on different shapes at once; every result checked."""
    cases = [Case(n=1 + i % 2, c_in=3 + 5 * i, c_out=4 + 7 * i, h=6 + i, w=9 - i, stride=1 + i % 2,
                  dilation=1 + i, mid_act=ACTIVATIONS[i % len(ACTIVATIONS)], out_act=ACTIVATIONS[(i + 1) % len(ACTIVATIONS)],
                  residual="nchw" if i % 2 else None, layout=LAYOUTS[i % 2]) for i in range(4)]
    work = [[(make_args(c, seed), c) for seed in range(20)] for c in cases]
    expected = [[reference64(args) for args, _ in calls] for calls in work]
    results = [[None] * 20 for _ in cases]
    errors = []
    barrier = threading.Barrier(len(cases))

    def worker(i):
        try:
            barrier.wait()
            for j, (args, _) in enumerate(work[i]):
                results[i][j] = call_op(args)
        except BaseException as e:  # reported below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i, calls in enumerate(work):
        for j, (args, case) in enumerate(calls):
            assert_matches_reference(results[i][j], args, accumulation_length=case.accumulation_length,
                                     ref=expected[i][j])


# -- stale results -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("poison", [True, False], ids=["nan-filled", "plain-allocator"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_second_call_is_not_stale(cpu_isa, layout, poison, monkeypatch):
    """The same call twice with different inputs: the second result is its own, not the first's
    (also with the real allocator, which tends to hand the freed output's memory back)."""
    if not poison:
        monkeypatch.setattr(cpu_backend, "empty_output", contract.empty_output)
    case = Case(n=2, c_in=9, c_out=20, h=13, w=11, dilation=3, mid_act="relu", out_act="none", layout=layout)
    first = make_args(case, seed=10)
    second = make_args(case, seed=11)
    y1 = call_op(first)
    assert_matches_reference(y1, first)
    y1_copy = y1.clone()
    del y1
    y2 = call_op(second)
    assert_matches_reference(y2, second)
    assert not torch.equal(y2, y1_copy)
    # Same weights, new x only (the packed weights are reused; the output must still be new).
    third = list(first)
    third[0] = make_args(case, seed=12)[0]
    assert_matches_reference(call_op(third), third)


# -- ISA selection --------------------------------------------------------------------------------------
def test_isa_selection_follows_the_environment(monkeypatch):
    from lwkernels import _C
    monkeypatch.delenv(cpu_backend.ISA_ENV, raising=False)
    assert lwkernels.selected_isa() == _C.best_isa()
    assert _C.isa_supported(_C.best_isa())
    for value in ("auto", " AUTO ", ""):
        monkeypatch.setenv(cpu_backend.ISA_ENV, value)
        assert lwkernels.selected_isa() == _C.best_isa()
    monkeypatch.setenv(cpu_backend.ISA_ENV, " Scalar ")
    assert lwkernels.selected_isa() == "scalar"


def test_isa_env_reads_what_os_environ_holds(monkeypatch):
    """isa_env() (the per-call check of prepared calls) reads the C environment: it must see every
    change made through os.environ, as os.environ.get would."""
    monkeypatch.delenv(cpu_backend.ISA_ENV, raising=False)
    assert cpu_backend.isa_env() is None
    for value in ("avx2", "", " Scalar ", "caf\u00e9"):
        monkeypatch.setenv(cpu_backend.ISA_ENV, value)
        assert cpu_backend.isa_env() == os.environ.get(cpu_backend.ISA_ENV) == value
    monkeypatch.delenv(cpu_backend.ISA_ENV)
    assert cpu_backend.isa_env() is None


def test_every_path_available_is_tested():
    """The cpu_isa fixture covers exactly the supported paths; scalar is always one of them."""
    from helpers import cpu_paths_here
    from lwkernels import _C
    paths = cpu_paths_here()
    assert "scalar" in paths
    assert paths == [p for p in ("scalar", "avx2", "avx512", "neon") if _C.isa_supported(p)]


# -- the packed-weight cache ---------------------------------------------------------------------------
CACHE_CASE = Case(n=2, c_in=8, c_out=12, h=6, w=7, dilation=2, mid_act="relu", out_act="none", residual=None)


def _check_with(args, pw_weight):
    new = list(args)
    new[5] = pw_weight
    y = call_op(new)
    assert_matches_reference(y, new)
    return y


@pytest.mark.parametrize("update", ["optimizer_step", "copy_no_grad", "inplace_view", "mul_"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_inplace_weight_update_repacks(cpu_isa, update, dtype):
    args = make_args(CACHE_CASE.with_(dtype=dtype), seed=20)
    weight = nn.Parameter(args[5].clone())
    y1 = _check_with(args, weight)
    if update == "optimizer_step":
        opt = torch.optim.SGD([weight], lr=0.5)
        weight.grad = torch.randn_like(weight)
        opt.step()
    else:
        with torch.no_grad():
            if update == "copy_no_grad":
                weight.copy_(torch.randn_like(weight))
            elif update == "inplace_view":  # through a view: shares the version counter
                weight[3:7].fill_(0.25)
            else:
                weight.mul_(-1.5)
    y2 = _check_with(args, weight)
    assert not torch.equal(y1, y2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_state_dict_repacks(cpu_isa, layout):
    """An eval JointBlock (fused path) gives the new result after load_state_dict."""
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    a = randomize_(lwkernels.JointBlock(8, 12, dilation=2), seed=1).eval()
    b = randomize_(lwkernels.JointBlock(8, 12, dilation=2), seed=2).eval()
    x = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(3)).contiguous(memory_format=fmt)
    with torch.no_grad():
        y_a, y_b = a(x), b(x)
        assert not torch.allclose(y_a, y_b)
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(x), y_b, rtol=0, atol=0)


def test_new_weight_at_the_same_address_is_repacked(cpu_isa):
    """A weight deleted and a new one allocated at the same address (and the same version
    counter value) must not reuse the dead weight's packing."""
    args = make_args(CACHE_CASE, seed=21)
    storage = np.array(args[5].numpy())  # owns the memory both weights will use
    first = torch.from_numpy(storage)
    _check_with(args, first)
    address, version = first.data_ptr(), first._version
    del first
    gc.collect()
    storage[...] = np.random.default_rng(0).standard_normal(storage.shape).astype(storage.dtype)
    second = torch.from_numpy(storage)
    assert second.data_ptr() == address and second._version == version
    _check_with(args, second)
    # The same through the allocator, a few times (freed memory is usually handed straight back).
    for seed in range(5):
        w = torch.randn(args[5].shape, generator=torch.Generator().manual_seed(100 + seed))
        _check_with(args, w)
        del w


def test_views_with_different_strides_at_one_address(cpu_isa):
    """A weight and its transpose share an address: each gets its own packing."""
    args = make_args(CACHE_CASE.with_(c_out=8), seed=22)  # square [8, 8] so both views fit
    base = torch.randn(8, 8, generator=torch.Generator().manual_seed(5))
    a = base.reshape(8, 8, 1, 1)
    b = base.t().unsqueeze(-1).unsqueeze(-1)
    assert a.data_ptr() == b.data_ptr() and a.stride() != b.stride()
    for w in (a, b, a, b):
        _check_with(args, w)


def test_layouts_and_paths_share_one_weight(monkeypatch):
    """One weight used with NCHW and channels_last inputs and on every CPU path, back and forth:
    each combination gets a packing for its own (path, layout)."""
    from helpers import cpu_paths_here
    args = make_args(CACHE_CASE, seed=23)
    weight = args[5]
    for isa in cpu_paths_here() * 2:
        monkeypatch.setenv(cpu_backend.ISA_ENV, isa)
        for fmt in (torch.channels_last, torch.contiguous_format, torch.channels_last):
            new = list(args)
            new[0] = args[0].contiguous(memory_format=fmt)
            _check_with(new, weight)


def test_steady_state_packs_once(cpu_isa, monkeypatch):
    """Repeated calls reuse the packed weight; an in-place update packs once more."""
    from lwkernels import _C
    calls = []
    real = _C.pack_pointwise_f32

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(_C, "pack_pointwise_f32", counting)
    args = make_args(CACHE_CASE, seed=24)
    weight = args[5].clone()
    for _ in range(4):
        _check_with(args, weight)
    assert len(calls) == 1
    with torch.no_grad():
        weight.add_(1.0)
    for _ in range(3):
        _check_with(args, weight)
    assert len(calls) == 2
    # An eval JointBlock, whose pointwise weight is an nn.Parameter that requires grad: inference
    # (no_grad) packs once; a call autograd records keeps no packing afterwards (gradcheck-style
    # `.data` perturbations of its inputs would go unseen), so the next recorded call packs again.
    block = randomize_(lwkernels.JointBlock(8, 12, dilation=2), seed=6).eval()
    x = make_args(CACHE_CASE, seed=25)[0]
    with torch.no_grad():
        expected = block(x)
        for _ in range(3):
            torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    assert len(calls) == 3
    for _ in range(3):
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    assert len(calls) == 5  # the first recorded call reused the no_grad packing, then dropped it


def test_cache_drops_dead_weights(cpu_isa):
    """Entries die with their weights (no unbounded growth), including the temporary float32
    copies made for float16 inputs."""
    gc.collect()
    before = len(cpu_backend.PACK_CACHE)
    for seed in range(6):
        _check_with(make_args(CACHE_CASE, seed=30 + seed), torch.randn(12, 8, 1, 1))
        check(CACHE_CASE.with_(dtype=torch.float16), seed=40 + seed)
    gc.collect()
    assert len(cpu_backend.PACK_CACHE) == before


def test_clear_cache_after_data_writes(cpu_isa):
    """Writes through .data bypass version counters (documented); lwkernels.clear_cache() repacks."""
    args = make_args(CACHE_CASE, seed=25)
    weight = nn.Parameter(args[5].clone())
    _check_with(args, weight)
    weight.data.copy_(torch.randn_like(weight))
    lwkernels.clear_cache()
    _check_with(args, weight)


def test_inference_mode_tensors(cpu_isa):
    """Weights created under torch.inference_mode (no version counter) work, and an in-place update
    inside inference_mode is seen."""
    with torch.inference_mode():
        args = make_args(CACHE_CASE, seed=26)
        weight = args[5].clone()
        _check_with(args, weight)
        weight.mul_(2.0)
        _check_with(args, weight)
