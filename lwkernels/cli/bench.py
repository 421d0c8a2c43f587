"""`lwkernels bench`: check the fused block against the reference on this machine, then time it.

Prints, per block shape, the reference (PyTorch eager, NCHW, BN separate) time, the fused time, the
speedup and the fused GFLOP/s; then the whole nine-block LightweightNet chain. Everything is
measured side by side in one process (medians).
"""
from __future__ import annotations

import json
import sys
from typing import Dict, List

SHAPE_SETS = ("blocks", "lightweightnet", "lightweightnet32")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="check and time the fused block against PyTorch")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 1 on CPU, 128 on CUDA)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--shapes", default="blocks", choices=SHAPE_SETS,
                   help="blocks: NETWORKS.md section 2; lightweightnet(32): its nine blocks at 224 (32) input")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (slow to compile)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds spent timing each provider per shape")
    p.add_argument("--model", default=None, help="time a whole model instead (e.g. lightweightnet)")
    p.add_argument("--train", action="store_true",
                   help="time training steps (forward + backward, batch 8 by default) instead of inference")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(run=run)


def _progress(step: int, total: int, label: str) -> None:
    end = "" if sys.stderr.isatty() else "\n"
    prefix = "\r\033[K" if sys.stderr.isatty() else ""
    print(f"{prefix}[{step}/{total}] {label}", end=end, file=sys.stderr, flush=True)


def _done_progress() -> None:
    if sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)


def run(args) -> int:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    default_batch = 128 if device.startswith("cuda") else (8 if args.train else 1)
    batch = args.batch if args.batch is not None else default_batch
    if batch < 1:
        raise ValueError(f"--batch must be positive, got {batch}")
    dtype = getattr(torch, args.dtype)

    if args.model is not None:
        from ..bench.models import print_model_bench

        return print_model_bench(args.model, batch=batch, device=device, dtype=dtype, min_time=args.min_time,
                                 json_path=args.json, train=args.train)
    if args.train:
        from ..bench.training import print_train_bench

        print_train_bench(batch=batch, device=device, dtype=dtype, min_time=args.min_time, json_path=args.json)
        return 0
    return _bench_blocks(args, device, batch, dtype)


def _bench_blocks(args, device: str, batch: int, dtype) -> int:
    import torch

    from ..bench.harness import environment, geomean, make_block, make_input, make_provider, matmul_rate, median_time
    from ..nn.fuse import to_reference
    from ..models.shapes import BENCHMARK_BLOCKS, lightweightnet_blocks

    shapes = {
        "blocks": list(BENCHMARK_BLOCKS),
        "lightweightnet": lightweightnet_blocks(224),
        "lightweightnet32": lightweightnet_blocks(32),
    }[args.shapes]
    chain_shapes = lightweightnet_blocks(shapes[0].size if args.shapes != "blocks" else 224)
    providers = ["eager", "eager_channels_last"] + ([] if args.no_compile else ["compile"]) + ["lwkernels"]
    env = environment(device)
    print(f"lwkernels bench: {env['device']}, {device}, {args.dtype}, batch {batch}, "
          f"torch {env['torch']}, threads {env['threads']}" + (f", CPU path {env['cpu_path']}" if "cpu_path" in env else ""))

    # 1. Correctness on this machine, before any timing.
    failures = _check(shapes, device, dtype)
    if failures:
        for line in failures:
            print(f"MISMATCH {line}", file=sys.stderr)
        print("the fused block does not match the reference on this machine; not timing it", file=sys.stderr)
        return 1
    print(f"checked: fused == reference on all {len(shapes)} shapes")

    # 2. Per-shape timings.
    rows: List[Dict] = []
    total = len(shapes) + 1
    for i, shape in enumerate(shapes, 1):
        _progress(i, total, shape.name)
        block = make_block(shape, dtype, device)
        x = make_input(shape, batch, dtype, device)
        reference = to_reference(block)
        times = {p: median_time(make_provider(p, block, x, reference), args.min_time) for p in providers}
        rows.append(_row(shape.name, times, shape.flops(batch)))

    # 3. The whole nine-block chain.
    _progress(total, total, "LightweightNet 9-block chain")
    chain = torch.nn.Sequential(*(make_block(s, dtype, device, seed=k) for k, s in enumerate(chain_shapes))).eval()
    x = make_input(chain_shapes[0], batch, dtype, device)
    reference = to_reference(chain)
    times = {p: median_time(make_provider(p, chain, x, reference), args.min_time) for p in providers}
    chain_row = _row(f"chain ({chain_shapes[0].size} input)", times, sum(s.flops(batch) for s in chain_shapes))
    _done_progress()

    # 4. The ceiling: no kernel computes the pointwise GEMM faster than torch.mm's rate.
    rate = matmul_rate(device, dtype, min_time=args.min_time)
    for shape, row in zip(shapes, rows):
        row["pointwise_floor_ms"] = shape.pointwise_flops(batch) / rate * 1e3
        row["max_speedup_vs_eager"] = row["ms"]["eager"] / row["pointwise_floor_ms"]

    _print_table(rows + [chain_row], providers)
    speedups = [r["speedup_vs_eager"] for r in rows]
    mean = geomean(speedups)
    ceiling = geomean([r["max_speedup_vs_eager"] for r in rows])
    print(f"geometric mean speedup over the {len(rows)} shapes: {mean:.2f}x "
          f"(slowest shape {min(speedups):.2f}x)")
    print(f"ceiling: torch.mm runs at {rate / 1e9:.1f} GFLOP/s here; the pointwise GEMMs alone at that rate would be "
          f"{ceiling:.2f}x eager (geometric mean), so lwkernels reaches {mean / ceiling:.0%} of the reachable speedup")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "batch": batch, "dtype": args.dtype, "device": device,
                       "rows": rows, "chain": chain_row, "geomean_speedup": mean,
                       "matmul_gflops": rate / 1e9, "ceiling_geomean_speedup": ceiling}, f, indent=2)
    return 0


def _check(shapes, device: str, dtype) -> List[str]:
    """Compare the fused block with the reference on a small batch of every shape."""
    import torch

    from ..bench.harness import make_block, make_input
    from ..nn.fuse import to_reference

    failures = []
    tol = {torch.float32: 1e-4, torch.float64: 1e-10}.get(dtype, 2e-2)
    for shape in shapes:
        block = make_block(shape, dtype, device)
        x = make_input(shape, 2, dtype, device)
        with torch.inference_mode():
            expected = to_reference(block).double()(x.double())
            got = block(x).double()
        scale = expected.abs().max().item() or 1.0
        err = (got - expected).abs().max().item() / scale
        if not err <= tol:  # also catches NaN
            failures.append(f"{shape.name}: max relative error {err:.3g} > {tol:g}")
    return failures


def _row(name: str, times: Dict[str, float], flops: int) -> Dict:
    fused = times["lwkernels"]
    return {
        "shape": name,
        "ms": {p: t * 1e3 for p, t in times.items()},
        "speedup_vs_eager": times["eager"] / fused,
        "gflops": flops / fused / 1e9,
    }


def _print_table(rows: List[Dict], providers: List[str]) -> None:
    headers = ["shape"] + [f"{p} ms" for p in providers] + ["speedup", "GFLOP/s"]
    table = [[r["shape"]] + [f"{r['ms'][p]:.3f}" for p in providers] +
             [f"{r['speedup_vs_eager']:.2f}x", f"{r['gflops']:.1f}"] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in table)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    for line in table:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
    print("speedup = eager (PyTorch, NCHW, BN separate) / lwkernels; GFLOP/s of lwkernels (dw + pw multiply-adds x2)")
