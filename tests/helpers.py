"""Shared helpers of the correctness tests: argument builders for the fused op, the float64
reference, dtype-aware tolerances, output checks, and the plain nn.Module composition that
anchors "correct" on PyTorch's own modules.

Everything here is deterministic (explicit torch.Generator seeds), so a failing case reproduces
from its test id alone.
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lwkernels.cpu.backend import CPU_PATHS, ISA_ENV
from lwkernels.ops.reference import joint_block_reference

ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "silu")
#: How x is laid out in memory: dense NCHW, dense channels_last, or non-contiguous views.
X_LAYOUTS = ("nchw", "nhwc", "sliced", "permuted", "sliced_nhwc", "expanded")
LOW_PRECISION = (torch.float16, torch.bfloat16)

IntPair = Union[int, Tuple[int, int]]


def pair(v: IntPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@dataclass(frozen=True)
class Case:
    """One call of the fused op: geometry, options, layouts and dtype."""

    n: int = 2
    c_in: int = 3
    c_out: int = 5
    h: int = 7
    w: int = 7
    kernel: IntPair = 3
    stride: IntPair = 1
    padding: Optional[IntPair] = None  # None: dilation * (k - 1) // 2 per dimension (the op's default)
    dilation: IntPair = 1
    mid_act: str = "none"
    out_act: str = "relu"
    dw_scale: bool = True
    dw_shift: bool = True
    pw_scale: bool = True
    pw_shift: bool = True
    residual: Optional[str] = None  # None, or the residual's layout: "nchw" / "nhwc"
    layout: str = "nchw"  # one of X_LAYOUTS
    dtype: torch.dtype = torch.float32

    def with_(self, **changes) -> "Case":
        return replace(self, **changes)

    @property
    def kernel_hw(self) -> Tuple[int, int]:
        return pair(self.kernel)

    @property
    def stride_hw(self) -> Tuple[int, int]:
        return pair(self.stride)

    @property
    def dilation_hw(self) -> Tuple[int, int]:
        return pair(self.dilation)

    @property
    def padding_hw(self) -> Tuple[int, int]:
        if self.padding is not None:
            return pair(self.padding)
        (kh, kw), (dh, dw) = self.kernel_hw, self.dilation_hw
        return dh * (kh - 1) // 2, dw * (kw - 1) // 2

    @property
    def out_shape(self) -> Tuple[int, int, int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_hw, self.stride_hw, self.padding_hw, self.dilation_hw
        return self.n, self.c_out, conv_out(self.h, kh, sh, ph, dh), conv_out(self.w, kw, sw, pw, dw)

    @property
    def accumulation_length(self) -> int:
        """Terms summed per output: the depthwise taps, then the pointwise channels."""
        kh, kw = self.kernel_hw
        return kh * kw + self.c_in

    def __str__(self) -> str:  # compact, stable pytest ids
        parts = [f"n{self.n}c{self.c_in}-{self.c_out}", f"{self.h}x{self.w}", f"k{self.kernel}",
                 f"s{self.stride}", f"p{self.padding}", f"d{self.dilation}", self.mid_act, self.out_act,
                 "".join("1" if f else "0" for f in (self.dw_scale, self.dw_shift, self.pw_scale, self.pw_shift)),
                 f"res{self.residual}", self.layout, str(self.dtype).replace("torch.", "")]
        return "-".join(parts).replace(" ", "").replace("(", "").replace(")", "").replace(",", "_")


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _uniform(gen: torch.Generator, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)


def layout_x(values: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    """A tensor equal to `values` ([N, C, H, W]) laid out in memory as `layout` says."""
    n, c, h, w = values.shape
    if layout == "nchw":
        return values.contiguous()
    if layout == "nhwc":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # every other row of a taller buffer, a column window of a wider one
        big = _randn(gen, n, c, 2 * h + 1, w + 3).to(values.dtype)
        big[:, :, 1::2, 2:2 + w] = values
        return big[:, :, 1::2, 2:2 + w]
    if layout == "permuted":  # stored as [H, N, W, C]
        return values.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
    if layout == "sliced_nhwc":  # a channel window of a wider channels_last buffer
        big = _randn(gen, n, c + 3, h, w + 1).to(values.dtype).contiguous(memory_format=torch.channels_last)
        big[:, 1:1 + c, :, :w] = values
        return big[:, 1:1 + c, :, :w]
    if layout == "expanded":  # batch broadcast with stride 0 (all images equal)
        return values[:1].expand(n, c, h, w)
    raise ValueError(f"unknown layout {layout!r}")


def make_args(case: Case, seed: int = 0) -> List:
    """The op's 13 arguments for `case`, values of order 1..10 so that relu6 clips, in case.dtype.

    Every value is nonzero and random, so a zero-filled or stale output tile differs from the
    reference."""
    gen = torch.Generator().manual_seed(seed)
    (kh, kw) = case.kernel_hw
    dt = case.dtype
    x = 2.0 * _randn(gen, case.n, case.c_in, case.h, case.w)
    x = layout_x(x.to(dt), case.layout, gen)
    dw_weight = (_randn(gen, case.c_in, 1, kh, kw) / math.sqrt(kh * kw)).to(dt)
    dw_scale = _uniform(gen, 0.5, 1.5, case.c_in).to(dt) if case.dw_scale else None
    dw_shift = (0.5 * _randn(gen, case.c_in)).to(dt) if case.dw_shift else None
    pw_weight = (_randn(gen, case.c_out, case.c_in, 1, 1) / math.sqrt(case.c_in)).to(dt)
    pw_scale = _uniform(gen, 0.5, 2.0, case.c_out).to(dt) if case.pw_scale else None
    pw_shift = (0.5 * _randn(gen, case.c_out)).to(dt) if case.pw_shift else None
    residual = None
    if case.residual is not None:
        residual = layout_x(_randn(gen, *case.out_shape).to(dt), case.residual, gen)
    stride, padding, dilation = (list(case.stride_hw), list(case.padding_hw), list(case.dilation_hw))
    return [x, dw_weight, dw_scale, dw_shift, case.mid_act, pw_weight, pw_scale, pw_shift, residual,
            case.out_act, stride, padding, dilation]


def as_float64(args: Sequence) -> List:
    return [a.detach().double() if isinstance(a, torch.Tensor) else a for a in args]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch.set_num_threads(n) for the duration; restores the previous setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def reference64(args: Sequence) -> torch.Tensor:
    """joint_block_reference computed in float64 from the (possibly low-precision) arguments.

    Single-threaded: PyTorch's OpenMP convolutions on small tensors gain nothing from threads and
    slow down by orders of magnitude when the cores are shared with other work."""
    with torch_threads(1):
        return joint_block_reference(*as_float64(args))


def call_op(args: Sequence) -> torch.Tensor:
    return torch.ops.lwkernels.joint_block(*args)


# -- tolerances ------------------------------------------------------------------------------------
#: Unit roundoff of each dtype: one round-to-nearest has relative error at most this.
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}


def tolerance(dtype: torch.dtype, accumulation_length: int) -> Tuple[float, float]:
    """(rtol, atol) for the op's output in `dtype` against the float64 reference.

    float32/float64: rtol 1e-5 / 1e-12 and an atol scaled with sqrt(accumulation length) for
    values of order 1..10. float16/bfloat16 are computed in float32 and rounded once, so the
    error is one rounding of the output dtype (relative) plus the float32 error (absolute)."""
    root = math.sqrt(accumulation_length)
    if dtype == torch.float64:
        return 1e-12, 1e-12 * root
    if dtype == torch.float32:
        return 1e-5, 1e-5 * root
    if dtype in LOW_PRECISION:
        return UNIT_ROUNDOFF[dtype], 1e-5 * root
    raise ValueError(f"no tolerance for {dtype}")


def expected_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Output format the op promises: channels_last for a dense channels_last x that is not also
    NCHW-contiguous (size-1 dims make both true), NCHW for everything else."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def assert_matches_reference(y: torch.Tensor, args: Sequence, *, accumulation_length: Optional[int] = None,
                             ref: Optional[torch.Tensor] = None) -> None:
    """y is finite, has the input's dtype, the output shape and memory format, and equals the
    float64 reference within the dtype's tolerance."""
    x = args[0]
    if ref is None:
        ref = reference64(args)
    assert y.dtype == x.dtype, f"output dtype {y.dtype}, input dtype {x.dtype}"
    assert y.device == x.device
    assert tuple(y.shape) == tuple(ref.shape), f"output shape {list(y.shape)}, expected {list(ref.shape)}"
    fmt = expected_memory_format(x)
    assert y.is_contiguous(memory_format=fmt), \
        f"output strides {y.stride()} are not dense in {fmt} (input strides {x.stride()})"
    assert torch.isfinite(ref).all(), "test bug: the reference itself is not finite"
    bad = ~torch.isfinite(y)
    assert not bad.any(), f"{int(bad.sum())} of {y.numel()} outputs are NaN/inf (skipped or corrupt tiles?)"
    if accumulation_length is None:
        accumulation_length = args[1].shape[2] * args[1].shape[3] + x.shape[1]
    rtol, atol = tolerance(x.dtype, accumulation_length)
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)


# -- environment -----------------------------------------------------------------------------------
def host_openmp_loaded() -> bool:
    """True when the CPU kernels can run on an OpenMP runtime loaded in this process (PyTorch's).
    Asks what the automatic choice (the default, which tests restore) resolved to."""
    from lwkernels.cpu.backend import parallel_backend_in_use

    return parallel_backend_in_use().startswith("openmp")


def run_python(args: Sequence[str], cwd, env: Optional[dict] = None, timeout: float = 120):
    """`python *args` in a subprocess that imports the same lwkernels as this test process.

    It runs in `cwd` (give it a temporary directory): from the checkout's root, `-c` and `-m` would
    import the source tree's lwkernels/, which has no compiled _C when the package is installed."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=timeout)


@contextlib.contextmanager
def forced_isa(name: Optional[str]) -> Iterator[None]:
    """Set LWKERNELS_CPU_ISA for the duration (None: unset); restores the previous value."""
    old = os.environ.get(ISA_ENV)
    try:
        if name is None:
            os.environ.pop(ISA_ENV, None)
        else:
            os.environ[ISA_ENV] = name
        yield
    finally:
        if old is None:
            os.environ.pop(ISA_ENV, None)
        else:
            os.environ[ISA_ENV] = old


# -- the plain PyTorch composition ---------------------------------------------------------------
ACT_MODULES = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}


def randomize_batchnorm_(bn: nn.BatchNorm2d, gen: torch.Generator) -> nn.BatchNorm2d:
    """Non-trivial running statistics and affine parameters (fresh BNs are identities)."""
    with torch.no_grad():
        c = bn.num_features
        if bn.running_mean is not None:
            bn.running_mean.copy_(0.5 * _randn(gen, c))
            bn.running_var.copy_(_uniform(gen, 0.5, 2.0, c))
            bn.num_batches_tracked.fill_(3)
        if bn.weight is not None:
            bn.weight.copy_(_uniform(gen, 0.5, 1.5, c))
            bn.bias.copy_(0.5 * _randn(gen, c))
    return bn


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random conv weights/biases and BN state for every submodule, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(_randn(gen, *m.weight.shape) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.5 * _randn(gen, *m.bias.shape))
            elif isinstance(m, nn.BatchNorm2d):
                randomize_batchnorm_(m, gen)
    return module


def plain_modules(c_in: int, c_out: int, *, kernel: int = 3, stride: IntPair = 1, padding: Optional[IntPair] = None,
                  dilation: IntPair = 1, mid_norm: bool = False, bias: bool = False, affine: bool = True,
                  track_running_stats: bool = True, momentum: Optional[float] = 0.1, eps: float = 1e-5,
                  dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.ModuleDict:
    """depthwise / [mid_bn] / pointwise / bn as plain nn modules under JointBlock's submodule names."""
    if padding is None:
        d = pair(dilation)
        padding = (d[0] * (kernel - 1) // 2, d[1] * (kernel - 1) // 2)
    bn_kwargs = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats, dtype=dtype)
    mods = {"depthwise": nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation, groups=c_in, bias=bias, dtype=dtype)}
    if mid_norm:
        mods["mid_bn"] = nn.BatchNorm2d(c_in, **bn_kwargs)
    mods["pointwise"] = nn.Conv2d(c_in, c_out, 1, bias=bias, dtype=dtype)
    mods["bn"] = nn.BatchNorm2d(c_out, **bn_kwargs)
    return randomize_(nn.ModuleDict(mods), seed)


def plain_forward(mods: nn.ModuleDict, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                  mid_act: str = "none", act: str = "relu") -> torch.Tensor:
    """The joint block spelled out with PyTorch's modules, in the order docs/design.md defines it."""
    with torch_threads(1):  # see reference64
        return _plain_forward(mods, x, residual, mid_act, act)


def _plain_forward(mods, x, residual, mid_act, act):
    t = mods["depthwise"](x)
    if "mid_bn" in mods:
        t = mods["mid_bn"](t)
    t = ACT_MODULES[mid_act]()(t)
    y = mods["bn"](mods["pointwise"](t))
    if residual is not None:
        y = y + residual
    return ACT_MODULES[act]()(y)


def cpu_paths_here():
    """The CPU paths this machine can run (LWKERNELS_CPU_ISA values), read from lwkernels._C.

    Without a built extension there is nothing to choose from: "scalar" is returned so that the
    tests that need the kernels fail loudly (cpu_backend.native() says what is missing)."""
    try:
        from lwkernels import _C
    except ImportError:
        return ["scalar"]
    return [p for p in CPU_PATHS if _C.isa_supported(p)]


class OpRecorder(TorchDispatchMode):
    """Records the names of the aten/custom ops that run (below autograd)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def count(self, name="lwkernels.joint_block.default"):
        return self.ops.count(name)


def assert_freed_by_refcount(box: list) -> None:
    """Drops box's one item, the last reference to an object, and checks that the object is freed at
    once, with the garbage collector off: nothing holds it through a reference cycle. (Garbage
    already in cycles, such as torch.fx tracers that refer to a fused model, is collected first.)"""
    import gc
    import weakref

    gone = weakref.ref(box[0])
    gc.collect()
    gc.disable()
    try:
        box.clear()
        assert gone() is None
    finally:
        gc.enable()
