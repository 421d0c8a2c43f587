"""What the microbenchmarks and `lwkernels bench` share: building a block of a given shape with
realistic parameters, the providers compared side by side, and the timers (a median timer for one
provider, rounds with pauses for several)."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..nn.block import JointBlock
from ..nn.fuse import to_reference
from ..nn.inverted_residual import InvertedResidual
from ..models.shapes import BlockShape, InvertedResidualShape

#: Providers, in the order tables show them. "eager" is the plain PyTorch composition (NCHW, BN as
#: a separate op): the baseline speedups are quoted against. "onnxruntime" (the same composition
#: exported to ONNX, see onnxrt.py) needs the optional onnxruntime and onnx packages.
PROVIDERS = ("eager", "eager_channels_last", "compile", "onnxruntime", "lwkernels", "lwkernels_channels_last")


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (fresh BN is an
    identity, which would hide folding mistakes and flatter no one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return module


def make_block(shape: BlockShape, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> JointBlock:
    torch.manual_seed(seed)
    block = JointBlock(shape.in_channels, shape.out_channels, stride=shape.stride, dilation=shape.dilation,
                       kernel_size=shape.kernel_size)
    return randomize_batchnorm(block, seed).to(device=device, dtype=dtype).eval()


def make_inverted_residual(shape: InvertedResidualShape, dtype: torch.dtype = torch.float32, device="cpu",
                           seed: int = 0) -> InvertedResidual:
    torch.manual_seed(seed)
    block = InvertedResidual(shape.in_channels, shape.out_channels, shape.expand_ratio, stride=shape.stride,
                             dilation=shape.dilation, kernel_size=shape.kernel_size)
    return randomize_batchnorm(block, seed).to(device=device, dtype=dtype).eval()


def make_module(shape, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> nn.Module:
    """make_block for a BlockShape, make_inverted_residual for an InvertedResidualShape."""
    build = make_inverted_residual if isinstance(shape, InvertedResidualShape) else make_block
    return build(shape, dtype, device, seed)


def make_input(shape: BlockShape, batch: int, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, shape.in_channels, shape.size, shape.size, generator=g).to(device=device, dtype=dtype)


#: Compiled variants torch.compile may keep per function. Every benchmark shape compiles the same
#: forward() again; past dynamo's default limit (8) it would warn mid-run and then silently run the
#: remaining shapes uncompiled, so the "compile" column would time eager PyTorch.
COMPILES_PER_FUNCTION = 256


def allow_one_compile_per_shape() -> None:
    """Raise torch.compile's recompile limit (process-wide) so each benchmark shape is compiled."""
    import torch._dynamo

    config = torch._dynamo.config
    if config.recompile_limit < COMPILES_PER_FUNCTION:
        config.recompile_limit = COMPILES_PER_FUNCTION
    if config.accumulated_recompile_limit < COMPILES_PER_FUNCTION:
        config.accumulated_recompile_limit = COMPILES_PER_FUNCTION


def make_provider(name: str, module: nn.Module, x: torch.Tensor, reference: Optional[nn.Module] = None,
                  compile_mode: Optional[str] = None) -> Callable[[], torch.Tensor]:
    """A no-argument callable running `module`'s computation on `x` the way provider `name` does.

    `module` is the fused model (JointBlocks); `reference` its plain-PyTorch twin (to_reference()
    when omitted)."""
    if reference is None:
        reference = to_reference(module)
    reference = reference.eval()
    if name == "eager":
        fn, arg = reference, x
    elif name == "eager_channels_last":
        fn, arg = reference.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    elif name == "compile":
        allow_one_compile_per_shape()
        fn, arg = torch.compile(reference, mode=compile_mode), x
    elif name == "onnxruntime":
        from .onnxrt import make_ort_provider

        return make_ort_provider(reference, x, torch.get_num_threads())
    elif name == "lwkernels":
        fn, arg = module.eval(), x
    elif name == "lwkernels_channels_last":
        fn, arg = module.eval(), x.contiguous(memory_format=torch.channels_last)
    else:
        raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            y = fn(arg)
        sync()
        return y

    return run


def median_time(fn: Callable[[], object], min_time: float = 0.2, max_reps: int = 200, warmup: int = 2) -> float:
    """Median seconds per call over repetitions lasting at least `min_time` (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


#: Seconds every provider's round starts with, idle: long enough for the worker threads of the
#: provider before it (ONNX Runtime's pool, PyTorch's OpenMP team) to stop spinning and sleep.
ROUND_PAUSE = 0.1


def thread_pool(provider: str) -> str:
    """Which worker threads a CPU provider runs on: ONNX Runtime its own pool; PyTorch (eager and
    torch.compile's code) its OpenMP team; lwkernels' kernels that same team, or their own pool
    where PyTorch's OpenMP runtime is not loaded."""
    if provider == "onnxruntime":
        return "onnxruntime"
    if provider.startswith("lwkernels"):
        from ..cpu import backend

        return "openmp" if backend.parallel_backend_in_use().startswith("openmp") else "lwkernels"
    return "openmp"


def cpu_busy(window: float = 0.05) -> Optional[float]:
    """Fraction of the machine's CPU time spent busy over the next `window` seconds, from
    /proc/stat (niced processes count: they still delay a 2-thread team at every barrier); None
    where that file does not exist."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
        return sum(v), v[3] + v[4]  # total; idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(window)
        t1, i1 = sample()
    except OSError:
        return None
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_idle_cpu(max_busy: float = 0.1, timeout: float = 5.0, window: float = 0.05) -> float:
    """Sleep until the CPUs were at most `max_busy` busy (cpu_busy) over `window` seconds (other
    processes' load: call it while this process idles), for at most `timeout` seconds; returns the
    seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        busy = cpu_busy(window)
        if busy is None or busy <= max_busy:
            break
    return time.perf_counter() - start


def time_in_rounds(fns: Dict[str, Callable[[], object]], min_time: float = 0.3, rounds: int = 5,
                   pause: float = ROUND_PAUSE, warmup: int = 1, min_calls: int = 3,
                   max_calls: int = 200, pools: Optional[Dict[str, str]] = None,
                   idle_cpu: Optional[float] = None) -> Dict[str, List[float]]:
    """Seconds per call of every provider in `fns`, the providers taking turns in rounds.

    Engines leave worker threads spinning for a while after each call (ONNX Runtime's thread pool,
    PyTorch's OpenMP team), and those threads take cores from whatever runs next: timed call by
    call, one provider is billed for the other's spinning (lwkernels measured twice as slow right
    after ONNX Runtime calls). So each round gives every provider, in turn:

    1. a pause of `pause` seconds, in which the previous provider's threads go to sleep (only
       where the two run on different thread pools when `pools` names each provider's pool,
       e.g. by :func:`thread_pool`: a team spinning for its own next call takes nothing away);
    2. `warmup` untimed calls (they wake this provider's threads and refill the caches);
    3. back-to-back timed calls for at least ``min_time / rounds`` seconds (`min_calls` to
       `max_calls` calls).

    With `idle_cpu` (a fraction, e.g. 0.1), every turn first waits (up to 5 s) until the machine's
    CPUs are at most that busy with other processes' work: for shared machines.

    The provider order rotates from round to round, so no provider always follows the same one,
    and slow drifts of the machine's load reach every provider alike. Returns every timed call's
    seconds per provider; callers quote the median."""
    if rounds < 1 or min_calls < 1:
        raise ValueError("rounds and min_calls must be positive")
    names = list(fns)
    times: Dict[str, List[float]] = {name: [] for name in names}
    budget = min_time / rounds
    previous: Optional[str] = None
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            if pools is None or previous is None or pools[name] != pools[previous]:
                time.sleep(pause)
            if idle_cpu is not None:
                wait_for_idle_cpu(idle_cpu)
            previous = name
            for _ in range(warmup):
                fn()
            calls, start = 0, time.perf_counter()
            while calls < min_calls or (time.perf_counter() - start < budget and calls < max_calls):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                calls += 1
    return times


def medians(times: Dict[str, List[float]]) -> Dict[str, float]:
    """The median of every provider's call times."""
    return {name: statistics.median(t) for name, t in times.items()}


def geomean(values: List[float]) -> float:
    """Geometric mean (nan for no values)."""
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, min_time: float = 0.5) -> float:
    """FLOP/s of torch.mm on n x n operands, median: the practical ceiling for the pointwise GEMM."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)

    def run() -> None:
        torch.mm(a, b)
        sync()

    return 2.0 * n ** 3 / median_time(run, min_time, max_reps=50, warmup=2)


def environment(device: str = "cpu") -> Dict[str, str]:
    """Device and versions for extra_info / report headers."""
    import platform

    from .. import __version__
    from ..cpu.backend import parallel_backend_in_use, selected_isa

    info = {"torch": torch.__version__, "lwkernels": __version__, "threads": str(torch.get_num_threads())}
    if device.startswith("cuda"):
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = _cpu_name() or platform.processor() or platform.machine()
        info["cpu_path"] = selected_isa()
        info["cpu_parallel"] = parallel_backend_in_use()
    return info


def _cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
