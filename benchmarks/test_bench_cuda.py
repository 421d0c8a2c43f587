"""CUDA microbenchmarks of the joint block: PyTorch eager NCHW and channels_last (cuDNN),
torch.compile (default mode) and lwkernels (the fused Triton kernel, NCHW and channels_last)
side by side, for the nine shapes of lwkernels.models.shapes.BENCHMARK_BLOCKS at batch 128 in fp16, bf16
and fp32 (fp32 convolutions use TF32 exactly when torch.backends.cudnn.allow_tf32 says so, for every
provider). Every test is skipped without CUDA.

    pytest benchmarks/test_bench_cuda.py --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=median,ops

Each timed call synchronises the device. extra_info carries GFLOP/s, GB/s (the fused block's
compulsory traffic, lwkernels.models.shapes.BlockShape.bytes_moved), the device and the versions. For the
roofline view (copy bandwidth and matmul rate measured in the same run) use benchmarks/roofline.py.
"""
import pytest
import torch

from lwkernels.bench.harness import environment, make_block, make_input, make_provider
from lwkernels.nn.fuse import to_reference
from lwkernels.models.shapes import BENCHMARK_BLOCKS

BATCH = 128
PROVIDERS = ("eager", "eager_channels_last", "compile", "lwkernels", "lwkernels_channels_last")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def cuda_environment(dtype: torch.dtype) -> dict:
    info = environment("cuda")
    info["cuda"] = str(torch.version.cuda)
    info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if dtype == torch.float32:
        from lwkernels.triton.backend import cudnn_conv_uses_tf32

        info["tf32"] = str(cudnn_conv_uses_tf32())
    return info


@pytest.fixture(scope="module", autouse=True)
def cuda_kernel_registered():
    from lwkernels.triton.backend import register_cuda_kernel

    if not register_cuda_kernel():
        pytest.skip("Triton is not installed: lwkernels has no CUDA kernel to time")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", BENCHMARK_BLOCKS, ids=[s.name.replace(" ", "_") for s in BENCHMARK_BLOCKS])
def test_block(benchmark, timing_enabled, shape, dtype_name, provider):
    if provider == "compile" and not timing_enabled:
        pytest.skip("torch.compile is timed only under --benchmark-only")
    dtype = DTYPES[dtype_name]
    block = make_block(shape, dtype, "cuda")
    x = make_input(shape, BATCH, dtype, "cuda")
    # default mode: max-autotune spends minutes per shape, more than a lent GPU's session has
    run = make_provider(provider, block, x, to_reference(block), compile_mode="default")
    benchmark.group = f"{shape.name} batch {BATCH} {dtype_name}"
    benchmark.extra_info.update(cuda_environment(dtype))
    benchmark.extra_info.update(batch=BATCH, dtype=dtype_name, provider=provider)
    run()  # warm-up: compilation, Triton autotuning, cuDNN algorithm choice
    run()
    y = benchmark(run)  # run() synchronises the device after each call
    seconds = benchmark.stats.stats.median if timing_enabled and benchmark.stats else None
    if seconds:
        benchmark.extra_info["gflops"] = shape.flops(BATCH) / seconds / 1e9
        benchmark.extra_info["gbytes_per_s"] = shape.bytes_moved(BATCH, torch.finfo(dtype).bits // 8) / seconds / 1e9
    assert y.shape == (BATCH, shape.out_channels, shape.out_size, shape.out_size)
    assert y.dtype == dtype and y.is_cuda
