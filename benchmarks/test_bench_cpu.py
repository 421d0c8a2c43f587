"""CPU microbenchmarks of the joint block: PyTorch eager (NCHW and channels_last), torch.compile,
ONNX Runtime (when onnxruntime is installed) and lwkernels side by side, per block shape
(docs/networks.md, Benchmark block shapes: the MobileNet-style blocks and LightweightNet's nine
blocks at 224 and 32 input), batch 1 and 8, fp32, and the nine-block chains. Compare within a
group: `pytest --benchmark-only --benchmark-group-by=group --benchmark-columns=median,ops`.

pytest-benchmark times one test (one provider) at a time; each timed test starts after a pause
(harness.ROUND_PAUSE), so the worker threads of the provider timed before it have stopped spinning."""
import time

import pytest
import torch

from lwkernels.bench.harness import ROUND_PAUSE, environment, make_block, make_input, make_provider
from lwkernels.bench.onnxrt import onnxruntime_available
from lwkernels.nn.chain import JointChain
from lwkernels.nn.fuse import to_reference
from lwkernels.models.shapes import BENCHMARK_BLOCKS, lightweightnet_blocks

SHAPES = (
    [("blocks", s) for s in BENCHMARK_BLOCKS]
    + [("lightweightnet224", s) for s in lightweightnet_blocks(224)]
    + [("lightweightnet32", s) for s in lightweightnet_blocks(32)]
)
PROVIDERS = ("eager", "eager_channels_last", "compile", "onnxruntime", "lwkernels")
CHAINS = {"benchmark": list(BENCHMARK_BLOCKS), "lightweightnet224": lightweightnet_blocks(224),
          "lightweightnet32": lightweightnet_blocks(32)}


def _skip_unavailable(provider: str, timing_enabled: bool) -> None:
    if provider == "compile" and not timing_enabled:
        pytest.skip("torch.compile is timed only under --benchmark-only")
    if provider == "onnxruntime" and not onnxruntime_available():
        pytest.skip("onnxruntime is not installed (pip install '.[bench]')")


def _start(run, timing_enabled: bool) -> None:
    run()  # warm-up (and compilation) outside the timed region
    if timing_enabled:
        time.sleep(ROUND_PAUSE)
        run()  # wakes this provider's threads after the pause


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape_set,shape", SHAPES, ids=[f"{n}:{s.name.replace(' ', '_')}" for n, s in SHAPES])
def test_block(benchmark, timing_enabled, shape_set, shape, batch, provider):
    _skip_unavailable(provider, timing_enabled)
    block = make_block(shape, torch.float32, "cpu")
    x = make_input(shape, batch)
    run = make_provider(provider, block, x, to_reference(block))
    benchmark.group = f"{shape_set} {shape.name} batch {batch}"
    benchmark.extra_info.update(environment("cpu"))
    _start(run, timing_enabled)
    y = benchmark(run)
    seconds = benchmark.stats.stats.median if timing_enabled and benchmark.stats else None
    if seconds:
        benchmark.extra_info["gflops"] = shape.flops(batch) / seconds / 1e9
        benchmark.extra_info["gbytes_per_s"] = shape.bytes_moved(batch) / seconds / 1e9
    assert y.shape == (batch, shape.out_channels, shape.out_size, shape.out_size)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("chain_name", list(CHAINS))
def test_chain(benchmark, timing_enabled, chain_name, batch, provider):
    """Nine joint blocks in sequence (dilation 3): the benchmark blocks, or LightweightNet's at 224
    and 32 input."""
    _skip_unavailable(provider, timing_enabled)
    shapes = CHAINS[chain_name]
    chain = JointChain(*(make_block(s, seed=k) for k, s in enumerate(shapes))).eval()
    x = make_input(shapes[0], batch)
    run = make_provider(provider, chain, x, to_reference(chain))
    benchmark.group = f"{chain_name} chain batch {batch}"
    benchmark.extra_info.update(environment("cpu"))
    _start(run, timing_enabled)
    y = benchmark(run)
    if timing_enabled and benchmark.stats:
        benchmark.extra_info["gflops"] = sum(s.flops(batch) for s in shapes) / benchmark.stats.stats.median / 1e9
    assert y.shape == (batch, shapes[-1].out_channels, shapes[-1].out_size, shapes[-1].out_size)
