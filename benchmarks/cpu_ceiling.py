"""How close the joint blocks run to the CPU's limit, side by side with ONNX Runtime and the BLAS.

    python benchmarks/cpu_ceiling.py --batch 1 8 --fma-peak 460 --out ceiling.json

For every benchmark block (lwkernels.models.shapes.BENCHMARK_BLOCKS) and batch, three callables
take turns in rounds with pauses between them (harness.time_in_rounds, the acceptance protocol):

- lwkernels: the JointBlock on an NCHW input;
- onnxruntime: the block's plain composition exported to ONNX, default session options, the same
  thread count (lwkernels.bench.onnxrt);
- gemm: the block's pointwise product alone, [C_out, C_in] x [C_in, N*H*W], through torch.mm
  (PyTorch's BLAS: MKL in the x86 builds), into a preallocated output: no depthwise, no BatchNorm,
  no activation, and the operands laid out as a GEMM wants them.

Each row gives ms and GFLOP/s (a block: both convolutions' multiply-adds x 2; the GEMM: its own),
lwkernels / ORT and gemm / ORT speed ratios (above 1: faster than ORT), and with --fma-peak (the
machine's FMA rate at the thread count in GFLOP/s: `bench_kernels --fma-peak` prints it) each
rate as a fraction of that peak.

Why: where ORT runs a whole block as fast as the BLAS runs the block's GEMM alone, beating ORT by a
margin needs a GEMM that much faster than the BLAS's, since fusion saves only the depthwise side
(docs/performance.md, "Where the ceiling is").
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

try:
    import lwkernels  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the tree this file is in
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lwkernels.bench.harness import environment, make_block, make_input, make_provider, time_in_rounds
from lwkernels.bench.onnxrt import onnxruntime_available
from lwkernels.models.shapes import BENCHMARK_BLOCKS, BlockShape

PROVIDERS = ("lwkernels", "onnxruntime", "gemm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per provider per block, over all rounds")
    p.add_argument("--fma-peak", type=float, default=None,
                   help="the machine's FMA rate in GFLOP/s at --threads threads (bench_kernels --fma-peak)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    return p.parse_args(argv)


def gemm_provider(shape: BlockShape, batch: int):
    """torch.mm of the block's pointwise product (random operands) into a preallocated output."""
    g = torch.Generator().manual_seed(0)
    pixels = batch * shape.out_size * shape.out_size
    w = torch.randn(shape.out_channels, shape.in_channels, generator=g)
    x = torch.randn(shape.in_channels, pixels, generator=g)
    y = torch.empty(shape.out_channels, pixels)

    def run() -> torch.Tensor:
        return torch.mm(w, x, out=y)

    run.operands = (w, x)
    return run


def measure(shape: BlockShape, batch: int, rounds: int, min_time: float) -> Dict[str, float]:
    """Median seconds per call of each provider on one block and batch."""
    block = make_block(shape)
    x = make_input(shape, batch)
    fns = {"lwkernels": make_provider("lwkernels", block, x),
           "onnxruntime": make_provider("onnxruntime", block, x),
           "gemm": gemm_provider(shape, batch)}
    with torch.inference_mode():
        expected = fns["lwkernels"]()
        got = fns["onnxruntime"]()
    scale = expected.abs().max().item() or 1.0
    error = (got - expected).abs().max().item() / scale
    if error > 1e-4:  # (the two engines must compute the same block before their times compare)
        raise RuntimeError(f"{shape.name} batch {batch}: ONNX Runtime and lwkernels differ by {error:.2e}")
    times = time_in_rounds(fns, min_time=min_time * len(fns), rounds=rounds)
    return {name: statistics.median(t) for name, t in times.items()}


def row(shape: BlockShape, batch: int, seconds: Dict[str, float], fma_peak: Optional[float]) -> Dict:
    flops = {"lwkernels": shape.flops(batch), "onnxruntime": shape.flops(batch), "gemm": shape.pointwise_flops(batch)}
    r = {"block": shape.name, "batch": batch}
    for name in PROVIDERS:
        rate = flops[name] / seconds[name] / 1e9
        r[f"{name}_ms"] = seconds[name] * 1e3
        r[f"{name}_gflops"] = rate
        if fma_peak:
            r[f"{name}_of_peak"] = rate / fma_peak
    r["lwkernels_vs_ort"] = seconds["onnxruntime"] / seconds["lwkernels"]
    r["gemm_vs_ort"] = seconds["onnxruntime"] / seconds["gemm"]
    return r


def markdown(rows: List[Dict], fma_peak: Optional[float]) -> str:
    peak = fma_peak is not None
    head = ["block", "batch", "lwkernels ms", "ORT ms", "GEMM alone ms", "lwkernels GFLOP/s", "ORT GFLOP/s",
            "GEMM GFLOP/s"] + (["lwkernels of peak", "ORT of peak", "GEMM of peak"] if peak else []) \
        + ["lwkernels / ORT", "GEMM alone / ORT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [r["block"], str(r["batch"])] + [f"{r[f'{p}_ms']:.3f}" for p in PROVIDERS] \
            + [f"{r[f'{p}_gflops']:.0f}" for p in PROVIDERS] \
            + ([f"{r[f'{p}_of_peak']:.0%}" for p in PROVIDERS] if peak else []) \
            + [f"{r['lwkernels_vs_ort']:.2f}x", f"{r['gemm_vs_ort']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not onnxruntime_available():
        print("cpu_ceiling.py needs onnxruntime and onnx (pip install '.[bench]')", file=sys.stderr)
        return 2
    if args.threads < 1 or args.rounds < 1 or any(b < 1 for b in args.batch):
        print("--threads, --rounds and --batch must be positive", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows = []
    for batch in args.batch:
        for shape in BENCHMARK_BLOCKS:
            rows.append(row(shape, batch, measure(shape, batch, args.rounds, args.min_time), args.fma_peak))
    env = environment("cpu")
    print(f"<!-- {env.get('device')}, path {env.get('cpu_path')}, {args.threads} threads, torch {torch.__version__}, fp32, NCHW input -->")
    print(markdown(rows, args.fma_peak))
    if args.out is not None:
        args.out.write_text(json.dumps({"environment": env, "threads": args.threads, "fma_peak_gflops": args.fma_peak,
                                        "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
