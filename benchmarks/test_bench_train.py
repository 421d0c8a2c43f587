"""CPU training-step microbenchmarks: forward + backward of one joint block in training mode
(batch statistics), the plain PyTorch composition vs lwkernels, NCHW and channels_last, side by
side per block shape (docs/networks.md, Benchmark block shapes) at batch 8, fp32. Compare within a group:
`pytest benchmarks/test_bench_train.py --benchmark-only --benchmark-group-by=group
--benchmark-columns=median,ops`. Plain `pytest` runs each once as a smoke test."""
import pytest
import torch

from lwkernels.bench.harness import environment, make_block, make_input
from lwkernels.nn.fuse import to_reference
from lwkernels.models.shapes import BENCHMARK_BLOCKS
from lwkernels.bench.training import TRAIN_PROVIDERS, lightweightnet_chain, make_train_step, saved_activation_bytes


@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
@pytest.mark.parametrize("shape", BENCHMARK_BLOCKS, ids=[s.name.replace(" ", "_") for s in BENCHMARK_BLOCKS])
def test_train_step(benchmark, timing_enabled, shape, provider):
    batch = 8 if timing_enabled else 2
    block = make_block(shape, torch.float32, "cpu")
    x = make_input(shape, batch)
    run = make_train_step(provider, block if provider.startswith("lwkernels") else to_reference(block), x)
    benchmark.group = f"train {shape.name} batch {batch}"
    benchmark.extra_info.update(environment("cpu"))
    run()  # warm-up outside the timed region
    y = benchmark(run)
    if timing_enabled and benchmark.stats:
        # forward + backward ~ 3x the forward's multiply-adds
        benchmark.extra_info["gflops"] = 3 * shape.flops(batch) / benchmark.stats.stats.median / 1e9
    assert y.shape == (batch, shape.out_channels, shape.out_size, shape.out_size)


def test_saved_activation_memory(benchmark):
    """Bytes saved for backward by a training forward of the LightweightNet chain (224 input, batch
    2), reference vs lwkernels: the fused block does not keep the depthwise output."""
    chain = lightweightnet_chain(224)
    ref = to_reference(chain)
    x = make_input(lightweightnet_blocks_first(), 2)
    saved = benchmark.pedantic(lambda: (saved_activation_bytes(ref, x), saved_activation_bytes(chain, x)),
                               rounds=1, iterations=1)
    benchmark.group = "saved activations lightweightnet224 batch 2"
    benchmark.extra_info.update({"reference_bytes": saved[0], "lwkernels_bytes": saved[1]})
    print(f"\nsaved activations: reference {saved[0] / 2**20:.1f} MiB, lwkernels {saved[1] / 2**20:.1f} MiB")
    assert saved[1] < saved[0]


def lightweightnet_blocks_first():
    from lwkernels.models.shapes import lightweightnet_blocks

    return lightweightnet_blocks(224)[0]
