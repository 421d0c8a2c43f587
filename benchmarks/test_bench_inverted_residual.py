"""CPU microbenchmarks of the inverted residual: PyTorch eager, torch.compile, ONNX Runtime (when
onnxruntime is installed) and lwkernels side by side, batch 1 and 8, fp32 — per shape
(shapes.INVERTED_RESIDUAL_BLOCKS: MobileNetV2's inverted residuals and two dilated ones) and for
torchvision's mobilenet_v2 and mnasnet1_0 after lwkernels.fuse() (when torchvision is importable;
the reference is the torchvision model itself). Compare within a group:
`pytest --benchmark-only --benchmark-group-by=group --benchmark-columns=median,ops`."""
import pytest
import torch

from lwkernels.bench.harness import environment, make_input, make_inverted_residual, make_provider
from lwkernels.bench.onnxrt import onnxruntime_available
from lwkernels.bench.models import torchvision_pair
from lwkernels.nn.fuse import to_reference
from lwkernels.models.shapes import INVERTED_RESIDUAL_BLOCKS

from test_bench_cpu import _skip_unavailable, _start

PROVIDERS = ("eager", "compile", "onnxruntime", "lwkernels")
ZOO = ("mobilenet_v2", "mnasnet1_0")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", INVERTED_RESIDUAL_BLOCKS, ids=[s.name.replace(" ", "_") for s in INVERTED_RESIDUAL_BLOCKS])
def test_inverted_residual(benchmark, timing_enabled, shape, batch, provider):
    _skip_unavailable(provider, timing_enabled)
    block = make_inverted_residual(shape)
    x = make_input(shape, batch)
    run = make_provider(provider, block, x, to_reference(block))
    benchmark.group = f"inverted residual {shape.name} batch {batch}"
    benchmark.extra_info.update(environment("cpu"))
    _start(run, timing_enabled)
    y = benchmark(run)
    if timing_enabled and benchmark.stats:
        benchmark.extra_info["gflops"] = shape.flops(batch) / benchmark.stats.stats.median / 1e9
    assert y.shape == (batch, shape.out_channels, shape.out_size, shape.out_size)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", ZOO)
def test_torchvision_model(benchmark, timing_enabled, name, batch, provider):
    _skip_unavailable(provider, timing_enabled)
    try:
        fused, reference = torchvision_pair(name, 1000, seed=0)
    except RuntimeError as e:  # torchvision present but not importable beside this torch
        pytest.skip(str(e))
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    run = make_provider(provider, fused.eval(), x, reference.eval())
    benchmark.group = f"torchvision {name} batch {batch}"
    benchmark.extra_info.update(environment("cpu"))
    _start(run, timing_enabled)
    y = benchmark(run)
    assert y.shape == (batch, 1000)
