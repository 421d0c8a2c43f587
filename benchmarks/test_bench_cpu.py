"""CPU microbenchmarks of the joint block: PyTorch eager (NCHW and channels_last), torch.compile and
lwkernels side by side, per block shape (docs/networks.md, Benchmark block shapes: the
MobileNet-style blocks and LightweightNet's nine blocks at 224 and 32 input), batch 1 and 8, fp32.
Compare within a group: `pytest --benchmark-only --benchmark-group-by=group
--benchmark-columns=median,ops`."""
import pytest
import torch

from lwkernels.bench.harness import environment, make_block, make_input, make_provider
from lwkernels.nn.fuse import to_reference
from lwkernels.models.shapes import BENCHMARK_BLOCKS, lightweightnet_blocks

SHAPES = (
    [("blocks", s) for s in BENCHMARK_BLOCKS]
    + [("lightweightnet224", s) for s in lightweightnet_blocks(224)]
    + [("lightweightnet32", s) for s in lightweightnet_blocks(32)]
)
PROVIDERS = ("eager", "eager_channels_last", "compile", "lwkernels")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape_set,shape", SHAPES, ids=[f"{n}:{s.name.replace(' ', '_')}" for n, s in SHAPES])
def test_block(benchmark, timing_enabled, shape_set, shape, batch, provider):
    if provider == "compile" and not timing_enabled:
        pytest.skip("torch.compile is timed only under --benchmark-only")
    block = make_block(shape, torch.float32, "cpu")
    x = make_input(shape, batch)
    run = make_provider(provider, block, x, to_reference(block))
    benchmark.group = f"{shape_set} {shape.name} batch {batch}"
    benchmark.extra_info.update(environment("cpu"))
    run()  # warm-up (and compilation) outside the timed region
    y = benchmark(run)
    seconds = benchmark.stats.stats.median if timing_enabled and benchmark.stats else None
    if seconds:
        benchmark.extra_info["gflops"] = shape.flops(batch) / seconds / 1e9
        benchmark.extra_info["gbytes_per_s"] = shape.bytes_moved(batch) / seconds / 1e9
    assert y.shape == (batch, shape.out_channels, shape.out_size, shape.out_size)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("input_size", [224, 32])
def test_lightweightnet_chain(benchmark, timing_enabled, input_size, provider):
    """The nine joint blocks of LightweightNet in sequence (batch 1, dilation 3)."""
    if provider == "compile" and not timing_enabled:
        pytest.skip("torch.compile is timed only under --benchmark-only")
    shapes = lightweightnet_blocks(input_size)
    chain = torch.nn.Sequential(*(make_block(s, seed=k) for k, s in enumerate(shapes))).eval()
    x = make_input(shapes[0], 1)
    run = make_provider(provider, chain, x, to_reference(chain))
    benchmark.group = f"lightweightnet chain {input_size} batch 1"
    benchmark.extra_info.update(environment("cpu"))
    run()
    y = benchmark(run)
    if timing_enabled and benchmark.stats:
        benchmark.extra_info["gflops"] = sum(s.flops(1) for s in shapes) / benchmark.stats.stats.median / 1e9
    assert y.shape == (1, shapes[-1].out_channels, shapes[-1].out_size, shapes[-1].out_size)
