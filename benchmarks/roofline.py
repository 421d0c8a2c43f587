"""Where the joint block stands against the GPU's physical limits.

In one run: measure the device's copy bandwidth and its fp16/bf16 (and fp32, TF32 as PyTorch's conv
setting says) matmul rate, then time every provider on every block shape and report, per row,
time, achieved GB/s and TFLOP/s, and the fraction of the roofline bound

    bound = max(bytes_moved / copy bandwidth, flops / matmul rate of that dtype)

where bytes_moved is the fused block's compulsory traffic (read x and the weights, write y once) and
flops the multiply-adds of both convolutions (lwkernels.models.shapes.BlockShape). Unfused providers move
more bytes than that; the bound is the block's, not the provider's.

Results are printed and written as JSON and Markdown under benchmarks/results/ (device, versions,
date in the file). Needs a CUDA device; exits with status 2 and a message otherwise.

    python benchmarks/roofline.py                         # batch 128, fp16 and fp32, all providers
    python benchmarks/roofline.py --dtypes fp16 --providers eager_channels_last lwkernels_channels_last

Timing: triton.testing.do_bench (median, L2 flushed before each call, so small shapes are not served
from cache); each call synchronises.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path
from typing import Dict, List

import torch

try:
    import lwkernels  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the tree this file is in
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROVIDERS = ("eager", "eager_channels_last", "compile", "lwkernels", "lwkernels_channels_last")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp16", "fp32"])
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the 'compile' provider (max-autotune takes minutes per shape)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and Markdown results")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement (ms)")
    return p.parse_args(argv)


def bench_ms(fn, rep_ms: int) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median"))


def copy_bandwidth(rep_ms: int) -> float:
    """Bytes/s of a device-to-device copy (read + write) of a buffer far larger than L2."""
    free, _ = torch.cuda.mem_get_info()
    nbytes = min(2 ** 30, free // 4) // 16 * 16
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep_ms)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def matmul_rate(dtype: torch.dtype, rep_ms: int, tf32: bool) -> float:
    """Flop/s of an 8192^3 matmul in `dtype` (fp32: TF32 when `tf32`)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        ms = bench_ms(lambda: torch.mm(a, b), rep_ms)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n ** 3 / (ms * 1e-3)


def environment() -> Dict[str, str]:
    import triton

    import lwkernels
    from lwkernels.triton.backend import cudnn_conv_uses_tf32

    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "capability": "sm_%d%d" % torch.cuda.get_device_capability(0),
        "memory_gib": f"{props.total_memory / 2 ** 30:.0f}",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()),
        "lwkernels": lwkernels.__version__,
        "python": platform.python_version(),
        "tf32_for_fp32_convs": str(cudnn_conv_uses_tf32()),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def measure(args) -> Dict:
    from lwkernels.bench.harness import make_block, make_input, make_provider
    from lwkernels.nn.fuse import to_reference
    from lwkernels.triton.backend import cudnn_conv_uses_tf32, register_cuda_kernel
    from lwkernels.models.shapes import BENCHMARK_BLOCKS

    if not register_cuda_kernel():
        sys.exit("roofline.py: Triton is not installed, so lwkernels has no CUDA kernel to measure")
    env = environment()
    tf32 = cudnn_conv_uses_tf32()
    print(f"{env['device']} ({env['capability']}), torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}")
    bandwidth = copy_bandwidth(args.rep_ms)
    rates = {name: matmul_rate(DTYPES[name], args.rep_ms, tf32) for name in sorted(set(args.dtypes) | {"bf16"})}
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; matmul "
          + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in rates.items()) + (" (fp32 as TF32)" if tf32 else ""))

    rows: List[Dict] = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        itemsize = torch.finfo(dtype).bits // 8
        for shape in BENCHMARK_BLOCKS:
            block = make_block(shape, dtype, "cuda")
            x = make_input(shape, args.batch, dtype, "cuda")
            flops, nbytes = shape.flops(args.batch), shape.bytes_moved(args.batch, itemsize)
            bound_s = max(nbytes / bandwidth, flops / rates[dtype_name])
            baseline = None
            for provider in args.providers:
                run = make_provider(provider, block, x, to_reference(block), compile_mode=args.compile_mode)
                run()  # compilation / autotuning / algorithm choice outside the measurement
                seconds = bench_ms(run, args.rep_ms) * 1e-3
                if provider == "eager":
                    baseline = seconds
                row = {
                    "shape": shape.name, "dtype": dtype_name, "batch": args.batch, "provider": provider,
                    "time_ms": seconds * 1e3, "gbytes_per_s": nbytes / seconds / 1e9,
                    "tflops": flops / seconds / 1e12, "bound_ms": bound_s * 1e3,
                    "roofline_pct": 100 * bound_s / seconds,
                    "bound_by": "memory" if nbytes / bandwidth >= flops / rates[dtype_name] else "compute",
                    "speedup_vs_eager": (baseline / seconds) if baseline else None,
                }
                rows.append(row)
                print(f"{shape.name:>20} {dtype_name} {provider:>24}: {row['time_ms']:8.3f} ms "
                      f"{row['gbytes_per_s']:7.0f} GB/s {row['tflops']:6.1f} TFLOP/s {row['roofline_pct']:5.1f}% of bound")
                del run
            del block, x
            torch.cuda.empty_cache()
    return {"environment": env, "copy_bandwidth_gbytes_per_s": bandwidth / 1e9,
            "matmul_tflops": {k: v / 1e12 for k, v in rates.items()}, "bound_rate_dtype": "same as the block's",
            "rows": rows}


def markdown(result: Dict) -> str:
    env = result["environment"]
    lines = [
        f"# Joint block roofline on {env['device']}",
        "",
        f"{env['date_utc']} UTC; {env['capability']}, {env['memory_gib']} GiB; torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, lwkernels {env['lwkernels']}; "
        f"TF32 for fp32 convs: {env['tf32_for_fp32_convs']}.",
        "",
        f"Measured in the same run: copy bandwidth {result['copy_bandwidth_gbytes_per_s']:.0f} GB/s; matmul "
        + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in result["matmul_tflops"].items()) + ".",
        "Bound = max(compulsory bytes / copy bandwidth, flops / matmul rate of the block's dtype); "
        "% = bound / time.",
        "",
        "| shape | dtype | provider | time (ms) | GB/s | TFLOP/s | bound (ms) | % of bound | vs eager |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        speedup = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else ""
        lines.append(f"| {r['shape']} (batch {r['batch']}) | {r['dtype']} | {r['provider']} | {r['time_ms']:.3f} | "
                     f"{r['gbytes_per_s']:.0f} | {r['tflops']:.1f} | {r['bound_ms']:.3f} ({r['bound_by']}) | "
                     f"{r['roofline_pct']:.1f} | {speedup} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("roofline.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
              f"(torch {torch.__version__}). Nothing was measured.", file=sys.stderr)
        return 2
    result = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", result["environment"]["device"].lower()).strip("-")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    stem = args.out / f"roofline-{slug}-{stamp}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
