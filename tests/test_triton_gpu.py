"""The Triton kernel on a CUDA device: the full correctness grid in fp16, bf16 and fp32 (NCHW and
channels_last), every autotuning candidate, the autotuned op on the benchmark shapes, TF32 on/off,
int64 offsets (tensors past 2^31 elements), non-contiguous operands, opcheck and
torch.compile(fullgraph=True).

Everything is compared with the dtype-aware rule of docs/testing.md, Tolerances
(triton_helpers.py): the kernel's error against a float64 reference is at most twice PyTorch's own
error in the same dtype, plus the rounding the kernel's precision contract allows. Every element is
compared, and the launcher's outputs are pre-filled with NaN so an unwritten tile fails.

The first tests (registration, the TF32 decision) run anywhere; the rest are skipped without CUDA.
"""
from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

from helpers import Case, expected_memory_format, randomize_
from lwkernels import JointBlock
from lwkernels.ops.activation import activation_name
from lwkernels.triton.backend import cudnn_conv_uses_tf32, register_cuda_kernel
from lwkernels.nn.folding import fold_batchnorm
from lwkernels.ops.reference import joint_block_reference
from lwkernels.models.shapes import BENCHMARK_BLOCKS
from triton_helpers import (INTERPRETER_VIEW_CASES, assert_matches_lowp_rule, gpu_cases, gpu_grid_subset, make_case_args,
                            poison_kernel_outputs, to_device, transposed_pointwise)

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
HAS_BF16 = HAS_CUDA and torch.cuda.get_device_capability()[0] >= 8
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and Triton")]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LAYOUTS = ["nchw", "nhwc"]


def _cuda(f):
    for mark in cuda_only:
        f = mark(f)
    return f


def _skip_unsupported(dtype):
    if dtype == torch.bfloat16 and not HAS_BF16:
        pytest.skip("bf16 tensor-core dots need sm_80 or newer")


def _tf32(dtype) -> bool:
    """Whether the op uses TF32 for this dtype right now (what the rule must allow for)."""
    return dtype == torch.float32 and cudnn_conv_uses_tf32() and torch.cuda.get_device_capability()[0] >= 8


@pytest.fixture
def nan_outputs(monkeypatch):
    poison_kernel_outputs(monkeypatch)


# -- anywhere ----------------------------------------------------------------------------------------
def test_register_cuda_kernel():
    ok = register_cuda_kernel()
    if not HAS_TRITON:
        assert ok is False
        return
    assert ok is True and register_cuda_kernel() is True  # idempotent
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lwkernels::joint_block", "CUDA")


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_statistics_rows_cover_every_autotune_candidate():
    """The training kernel writes one statistics row per pixel tile of whichever config autotuning
    times, so its buffers need the rows of the smallest-pixel candidate (on a GPU a shortfall is an
    out-of-bounds write: 32 x 256 tiles against rows sized for 64 pixels once corrupted memory)."""
    import triton

    from lwkernels.triton.joint_block import _candidate_configs, _prune, launch_pixel_tiles

    for c_in, c_out in [(3, 17), (32, 64), (96, 96), (64, 200), (512, 1024)]:
        for m in (1, 63, 64, 65, 429, 100352):
            rows = launch_pixel_tiles(m, c_in, c_out, None)
            for config in _prune(_candidate_configs(), {"C_IN": c_in, "C_OUT": c_out}):
                needed = triton.cdiv(m, config.kwargs["BLOCK_P"])
                assert rows >= needed, f"{c_in}->{c_out}, {m} pixels: {rows} rows, {config} writes {needed}"
    assert launch_pixel_tiles(100, 3, 17, {"BLOCK_P": 16}) == 7


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_int64_indexing_exactly_when_an_offset_may_pass_2_pow_31():
    """The launcher's INDEX_64 decision: int32 for ordinary tensors, int64 once M or any tensor's
    reachable offset (its extent plus the masked lanes' margin) may reach 2^31."""
    from lwkernels.triton.joint_block import _needs_int64

    def meta(size, stride):  # shapes and strides only, no memory
        return torch.empty_strided(size, stride, device="meta")

    small = meta((128, 64, 112, 112), (64 * 112 * 112, 112 * 112, 112, 1))
    assert not _needs_int64(128 * 112 * 112, [small, None], margin=300)
    assert _needs_int64(2 ** 31 - 100, [small], margin=300)  # the pixel index itself
    huge_n = meta((257, 16, 512, 1024), (16 * 512 * 1024, 512 * 1024, 1024, 1))
    assert _needs_int64(1, [huge_n], margin=300)  # > 2^31 elements
    # a one-image view of a larger tensor: few elements, but masked lanes past the batch reach far
    view = meta((1, 8, 8, 8), (2 ** 24, 64, 8, 1))
    assert _needs_int64(64, [view], margin=300) and not _needs_int64(64, [view], margin=1)


def test_tf32_follows_pytorch_conv_setting(cudnn_tf32):
    torch.backends.cudnn.allow_tf32 = False
    assert cudnn_conv_uses_tf32() is False
    torch.backends.cudnn.allow_tf32 = True
    assert cudnn_conv_uses_tf32() is True
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None:  # the finer-grained API of newer PyTorch
        conv.fp32_precision = "ieee"
        assert cudnn_conv_uses_tf32() is False
        conv.fp32_precision = "tf32"
        assert cudnn_conv_uses_tf32() is True


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("dtype,arch,precision,tile,channels_last,stats,index_64", [
    ("fp16", 90, "tf32", (64, 32, 16, 1), True, False, False),
    ("bf16", 90, "tf32", (64, 32, 16, 1), True, False, False),
    ("fp32", 90, "tf32", (64, 32, 16, 1), True, False, False),
    ("fp32", 90, "ieee", (64, 32, 16, 1), False, False, False),
    ("fp16", 90, "tf32", (64, 32, 16, 2), False, False, False),
    ("fp16", 80, "tf32", (64, 32, 16, 1), True, False, False),
    ("bf16", 90, "tf32", (64, 32, 16, 1), True, True, False),   # the training statistics epilogue
    ("fp16", 80, "tf32", (128, 64, 32, 2), False, True, False),
    ("fp16", 90, "tf32", (64, 128, 32, 1), False, False, True),  # int64 indexing (tensors past 2^31)
    ("fp16", 90, "tf32", (64, 128, 32, 1), True, True, True),
], ids=str)
def test_compiles_for_gpu_targets_without_a_gpu(dtype, arch, precision, tile, channels_last, stats, index_64):
    """The GPU compiler's own checks (dot tiles >= 16, dtype casts, int64 address arithmetic, shared
    memory) that the interpreter skips, run on any Linux machine: the kernel lowers to PTX with
    tensor-core MMAs (fp16/bf16/TF32) or FMAs (full fp32) and assembles for sm_80/sm_90."""
    from lwkernels.triton import joint_block as triton_kernel

    if triton_kernel.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernel is an interpreted function")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ASTSource/GPUTarget ahead-of-time API")
    from lwkernels.triton.offline import compile_joint_block

    kernel = compile_joint_block(dtype, arch, precision, tile, channels_last, stats=stats, index_64=index_64)
    ptx = kernel.asm["ptx"]
    assert "mma" in ptx if precision == "tf32" else "mma" not in ptx
    if channels_last:
        assert "ld.global.v" in ptx or "cp.async" in ptx, "channels_last tap loads are not vectorised"
    # int32 indexing unless asked for int64: a 64-bit multiply of indices shows in the PTX as mul.lo.s64
    # (or mul.wide from 32-bit factors, which int32 address arithmetic also uses), a 64-bit division
    # of pixel indices as div.s64 / rem.s64.
    assert ("div.s64" in ptx or "rem.s64" in ptx) == index_64, "the pixel index type is not the one asked for"


# -- on the GPU --------------------------------------------------------------------------------------
def _launch(args, config=None):
    from lwkernels.triton.joint_block import joint_block_triton

    return joint_block_triton(*args, allow_tf32=_tf32(args[0].dtype), config=config)


def _launch_tile(args, tile):
    """Launch with tile = (BLOCK_P, BLOCK_CO, BLOCK_CI, num_stages). A num_stages=2 tile whose
    pipelined tap buffers do not fit in this GPU's shared memory for this dtype and kernel size is run
    with num_stages=1 instead (the autotuner discards such configs; the tile's logic is the same)."""
    from triton.runtime.errors import OutOfResources

    from lwkernels.triton.joint_block import tile_config

    try:
        return _launch(args, tile_config(*tile).all_kwargs())
    except OutOfResources:
        if tile[3] == 1:
            raise
        return _launch(args, tile_config(*tile[:3], 1).all_kwargs())


def _tile_for(case_index: int, case: Case):
    """Rotate through the tiles autotuning may pick for this shape, so the grid covers all of them."""
    from lwkernels.triton.joint_block import select_configs

    tiles = select_configs(case.c_in, case.c_out)
    return tiles[case_index % len(tiles)]


GRID = gpu_cases()
#: The part of GRID test_grid runs: all of it, or a third under LWKERNELS_GPU_GRID=quick (the GPU
#: check's short rerun), which still crosses every dtype and layout, odd channel counts and tiles.
RUN_GRID = gpu_grid_subset(GRID)


@_cuda
@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", range(len(RUN_GRID)), ids=[str(c) for c in RUN_GRID])
def test_grid(index, dtype, layout):
    _skip_unsupported(dtype)
    case = RUN_GRID[index]
    args = make_case_args(case, dtype, layout, device="cuda", seed=index)
    y = _launch_tile(args, _tile_for(index, case))
    assert_matches_lowp_rule(y, args, tf32=_tf32(dtype))


@_cuda
@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("layout,dtype", [("nhwc", torch.float16), ("nchw", torch.float16),
                                          ("nhwc", torch.bfloat16), ("nhwc", torch.float32)], ids=str)
def test_every_autotune_candidate(layout, dtype):
    """Each config the autotuner may pick compiles and is correct (partial tiles in every dimension),
    or is too big for this GPU's shared memory -- which the autotuner then skips -- but never all."""
    from triton.runtime.errors import OutOfResources

    from lwkernels.triton.joint_block import _candidate_configs

    _skip_unsupported(dtype)
    case = Case(n=2, c_in=80, c_out=300, h=15, w=13, stride=2, dilation=3, mid_act="relu", out_act="relu6",
                residual="nhwc")
    args = make_case_args(case, dtype, layout, device="cuda")
    lowp = joint_block_reference(*args)
    too_big = []
    for config in _candidate_configs():
        try:
            y = _launch(args, config.all_kwargs())
        except OutOfResources:
            assert config.num_stages > 1, f"a single-stage config does not fit: {config}"
            too_big.append(config)
            continue
        try:
            assert_matches_lowp_rule(y, args, tf32=_tf32(dtype), torch_lowp=lowp)
        except AssertionError as e:
            raise AssertionError(f"config {config}: {e}") from e
    assert len(too_big) < len(_candidate_configs()) // 2, f"most configs do not fit: {too_big}"


@_cuda
@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", BENCHMARK_BLOCKS, ids=lambda s: s.name.replace(" ", "_"))
def test_benchmark_shapes_through_the_op(shape, dtype, layout, monkeypatch):
    """The registered op (autotuned kernel) on the benchmark shapes at batch 2."""
    from lwkernels.triton import joint_block as triton_kernel

    assert register_cuda_kernel()
    calls = []
    launcher = triton_kernel.joint_block_triton
    monkeypatch.setattr(triton_kernel, "joint_block_triton", lambda *a, **k: calls.append(1) or launcher(*a, **k))
    case = Case(n=2, c_in=shape.in_channels, c_out=shape.out_channels, h=shape.size, w=shape.size,
                stride=shape.stride, dilation=shape.dilation, kernel=shape.kernel_size, mid_act="relu")
    args = make_case_args(case, dtype, layout, device="cuda")
    y = torch.ops.lwkernels.joint_block(*args)
    assert calls, "the op did not dispatch to the Triton kernel"
    assert_matches_lowp_rule(y, args, tf32=_tf32(dtype))


@_cuda
@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", INTERPRETER_VIEW_CASES, ids=str)
def test_non_contiguous_operands(case, dtype):
    _skip_unsupported(dtype)
    args = transposed_pointwise(make_case_args(case, dtype, case.layout, device="cuda"))
    assert not args[0].is_contiguous()
    assert_matches_lowp_rule(_launch(args), args, tf32=_tf32(dtype))


@_cuda
@pytest.mark.usefixtures("nan_outputs")
def test_tf32_exactly_when_pytorch_allows_it(cudnn_tf32):
    """fp32: full precision with TF32 off (error at fp32 level), visibly TF32 with it on."""
    assert register_cuda_kernel()
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("no TF32 before sm_80")
    case = Case(n=2, c_in=256, c_out=64, h=9, w=9, dilation=2)
    args = make_case_args(case, torch.float32, "nhwc", device="cuda")
    errors = {}
    for allowed in (False, True):
        torch.backends.cudnn.allow_tf32 = allowed
        y = torch.ops.lwkernels.joint_block(*args)
        comparison = assert_matches_lowp_rule(y, args, tf32=allowed)
        errors[allowed] = comparison.kernel_error
    assert errors[True] > 20 * errors[False], f"TF32 on/off errors {errors}: the setting made no difference"


@_cuda
def test_float64_uses_the_reference_composition():
    assert register_cuda_kernel()
    args = make_case_args(Case(n=2, c_in=3, c_out=5, h=7, w=7, dilation=2), torch.float64, "nhwc", device="cuda")
    y = torch.ops.lwkernels.joint_block(*args)
    torch.testing.assert_close(y, joint_block_reference(*args), rtol=0, atol=0)
    assert y.is_contiguous(memory_format=torch.channels_last)


@_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    args = make_case_args(Case(n=2, c_in=17, c_out=17, h=9, w=9), torch.float16, "nhwc", device="cuda:1")
    y = _launch(args)
    assert y.device == torch.device("cuda:1")
    assert_matches_lowp_rule(y, args)


@_cuda
@pytest.mark.slow
@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("what", ["elements_nchw", "elements_nhwc", "pixels"])
def test_offsets_past_2_pow_31(what):
    """x and y with more than 2^31 elements (and, for "pixels", more than 2^31 output pixels): the
    first and last rows of the output are checked against the reference on input row windows."""
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2 ** 30:
        pytest.skip("needs 12 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    if what == "pixels":
        n, c, c_out, h, w = 3, 1, 1, 27000, 27000
    else:
        n, c, c_out, h, w = 257, 16, 16, 512, 1024
    assert n * c * h * w > 2 ** 31
    if what == "elements_nhwc":
        x = torch.randn(n, h, w, c, generator=g, device="cuda", dtype=torch.float16).permute(0, 3, 1, 2)
    else:
        x = torch.randn(n, c, h, w, generator=g, device="cuda", dtype=torch.float16)
    check_first_and_last_rows(x, c_out, device="cuda")


def check_first_and_last_rows(x: torch.Tensor, c_out: int, device) -> None:
    """Run a k3/dilation-1/padding-1 block on x; check output rows 0..8 of image 0 (they need input
    rows 0..9) and rows h-9..h-1 of image n-1 (input rows h-10..h-1) against the reference."""
    n, c, h, w = x.shape
    weights = make_case_args(Case(n=1, c_in=c, c_out=c_out, h=4, w=4, mid_act="relu"), x.dtype, "nchw",
                             device=device)
    args = [x] + weights[1:]
    y = _launch(args)
    assert y.shape == (n, c_out, h, w) and y.is_contiguous(memory_format=expected_memory_format(x))
    top = [x[:1, :, :10]] + args[1:]
    assert_matches_lowp_rule(y[:1, :, :9], top, crop=lambda t: t[:, :, :9])
    bottom = [x[-1:, :, -10:]] + args[1:]
    assert_matches_lowp_rule(y[-1:, :, -9:], bottom, crop=lambda t: t[:, :, 1:])


def _fused_args(block: JointBlock, x, residual=None):
    """The op arguments JointBlock.forward passes (BN folded), detached."""
    dw, pw = block.depthwise, block.pointwise
    dw_scale, dw_shift = fold_batchnorm(block.mid_bn, dw.bias)
    pw_scale, pw_shift = fold_batchnorm(block.bn, pw.bias)
    args = [x, dw.weight, dw_scale, dw_shift, activation_name(block.mid_act), pw.weight, pw_scale, pw_shift,
            residual, activation_name(block.act), list(dw.stride), list(dw.padding), list(dw.dilation)]
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in args]


def _block(dtype, c_in=24, c_out=40, stride=2, dilation=3):
    block = JointBlock(c_in, c_out, stride=stride, dilation=dilation, mid_norm=True, activation="relu6")
    return randomize_(block, seed=3).to(device="cuda", dtype=dtype).eval()


@_cuda
@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_joint_block_module(dtype, layout):
    _skip_unsupported(dtype)
    assert register_cuda_kernel()
    block = _block(dtype)
    x = make_case_args(Case(n=3, c_in=24, c_out=40, h=19, w=17), dtype, layout, device="cuda")[0]
    residual = to_device(torch.randn(3, 40, 10, 9, dtype=dtype), "cuda")
    with torch.no_grad():
        y = block(x, residual)
    assert_matches_lowp_rule(y, _fused_args(block, x, residual), tf32=_tf32(dtype))


@_cuda
@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_torch_compile_fullgraph(dtype, layout):
    assert register_cuda_kernel()
    torch._dynamo.reset()
    block = _block(dtype)
    compiled = torch.compile(block, fullgraph=True)
    for n in (2, 3):  # a second batch size: recompiles or goes dynamic, never breaks the graph
        x = make_case_args(Case(n=n, c_in=24, c_out=40, h=19, w=17), dtype, layout, device="cuda")[0]
        with torch.no_grad():
            y = compiled(x)
        assert_matches_lowp_rule(y, _fused_args(block, x), tf32=_tf32(dtype))


@_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    assert register_cuda_kernel()
    cases = [Case(n=2, c_in=5, c_out=17, h=7, w=6, stride=2, dilation=2, mid_act="relu", residual="nhwc"),
             Case(n=1, c_in=17, c_out=3, h=5, w=5, dw_scale=False, dw_shift=False, pw_scale=False, pw_shift=False,
                  out_act="relu6")]
    for case in cases:
        args = make_case_args(case, torch.float32, layout, device="cuda")
        for i in (0, 1, 2, 5, 6, 7, 8):
            if isinstance(args[i], torch.Tensor):
                args[i].requires_grad_(True)
        torch.library.opcheck(torch.ops.lwkernels.joint_block.default, tuple(args))


@_cuda
@pytest.mark.usefixtures("nan_outputs")
def test_random_shapes():
    """Hypothesis-style random sweep (seeded, so failures reproduce): shapes, options, dtypes, tiles."""
    from lwkernels.triton.joint_block import select_configs

    rng = torch.Generator().manual_seed(1234)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    for trial in range(60):
        k = pick([1, 3, 5])
        dilation, stride = pick([1, 2, 3, 5]), pick([1, 2])
        pad = dilation * (k - 1) // 2 + pick([0, 0, 1])
        span = dilation * (k - 1) + 1
        c_in, c_out = pick([1, 2, 3, 7, 16, 17, 31, 48, 65, 130]), pick([1, 3, 8, 17, 33, 64, 100, 257])
        h, w = max(pick([1, 2, 5, 8, 13, 31]), span - 2 * pad), max(pick([1, 3, 6, 11, 16, 29]), span - 2 * pad)
        case = Case(n=pick([1, 2, 3]), c_in=c_in, c_out=c_out, h=h, w=w, kernel=k, stride=stride, padding=pad,
                    dilation=dilation, mid_act=pick(["none", "relu", "relu6"]), out_act=pick(["none", "relu", "relu6"]),
                    residual=pick([None, "nchw", "nhwc"]))
        dtype = pick(DTYPES if HAS_BF16 else DTYPES[::2])
        args = make_case_args(case, dtype, pick(LAYOUTS), device="cuda", seed=trial)
        tile = pick(select_configs(c_in, c_out))
        try:
            assert_matches_lowp_rule(_launch_tile(args, tile), args, tf32=_tf32(dtype))
        except AssertionError as e:
            raise AssertionError(f"trial {trial}: {case} {dtype} tile {tile}: {e}") from e


# Keep the grid honest: it must contain the awkward cases docs/testing.md lists (The awkward-shape grid).
def test_grid_covers_the_awkward_cases():
    channels = {c.c_in for c in GRID} | {c.c_out for c in GRID}
    assert {1, 3, 17} <= channels
    assert {1, 2, 3, 5} <= {c.dilation for c in GRID if isinstance(c.dilation, int)}
    assert {1, 2} <= {c.stride for c in GRID if isinstance(c.stride, int)}
    assert 0 in {c.n for c in GRID} and 1 in {c.n for c in GRID}
    assert any(c.h % 2 and c.stride == 2 for c in GRID)
    assert any(min(c.h, c.w) < c.dilation_hw[0] * (c.kernel_hw[0] - 1) + 1 for c in GRID)
    assert set(itertools.chain.from_iterable((c.mid_act, c.out_act) for c in GRID)) == {"none", "relu", "relu6", "hardswish", "silu"}
