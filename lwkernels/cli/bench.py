"""`lwkernels bench`: check the fused block against the reference on this machine, then time it.

Prints, per block shape, the reference (PyTorch eager, NCHW, BN separate) time, the fused time, the
speedup and the fused GFLOP/s; then the nine-block chains. Where onnxruntime is importable (CPU,
fp32), ONNX Runtime running the same composition exported to ONNX is a column too, with the
lwkernels / ONNX Runtime speed ratio. Everything is measured in one process, the providers taking
turns in rounds with pauses between thread pools (lwkernels.bench.harness.time_in_rounds); the
table gives medians.
"""
from __future__ import annotations

import json
import sys
from typing import Dict, List

SHAPE_SETS = ("blocks", "lightweightnet", "lightweightnet32", "inverted_residuals")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="check and time the fused block against PyTorch")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 1 on CPU, 128 on CUDA)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--shapes", default="blocks", choices=SHAPE_SETS,
                   help="blocks: the MobileNet-style benchmark blocks (shapes.BENCHMARK_BLOCKS); "
                        "lightweightnet(32): its nine blocks at 224 (32) input; inverted_residuals: "
                        "MobileNetV2's inverted residuals and two dilated ones (shapes.INVERTED_RESIDUAL_BLOCKS)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (slow to compile)")
    p.add_argument("--no-onnxruntime", action="store_true",
                   help="skip the ONNX Runtime column (shown when onnxruntime is installed, CPU fp32 only)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds in which the providers take turns (each gets min-time / rounds per round)")
    p.add_argument("--pause", type=float, default=None,
                   help="seconds of idle before a provider's turn when the thread pool changes (default 0.1)")
    p.add_argument("--idle-cpu", type=float, default=None, metavar="FRACTION",
                   help="on a shared machine: before each turn wait (up to 5 s) until other processes keep "
                        "the CPUs at most this busy")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds spent timing each provider per shape")
    p.add_argument("--model", default=None,
                   help="time a whole model instead: lightweightnet, mobilenetv1, ... or torchvision:NAME "
                        "(e.g. torchvision:mobilenet_v2: the model fuse() made of it vs the original)")
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
                                 json_path=args.json, train=args.train, compile=not args.no_compile,
                                 onnxruntime=_with_onnxruntime(args, device, dtype), rounds=args.rounds,
                                 pause=args.pause, idle_cpu=args.idle_cpu)
    if args.train:
        from ..bench.training import print_train_bench

        print_train_bench(batch=batch, device=device, dtype=dtype, min_time=args.min_time, json_path=args.json)
        return 0
    return _bench_blocks(args, device, batch, dtype)


def _with_onnxruntime(args, device: str, dtype) -> bool:
    """ONNX Runtime is a provider on the CPU in fp32 whenever it is installed, unless switched off."""
    import torch

    from ..bench.onnxrt import onnxruntime_available

    return (not args.no_onnxruntime and device == "cpu" and dtype == torch.float32
            and onnxruntime_available())


def _bench_blocks(args, device: str, batch: int, dtype) -> int:
    import torch

    from ..bench.harness import (ROUND_PAUSE, environment, geomean, make_block, make_input, make_module,
                                 make_provider, matmul_rate, medians, thread_pool, time_in_rounds)
    from ..nn.chain import JointChain
    from ..nn.fuse import to_reference
    from ..models.shapes import BENCHMARK_BLOCKS, INVERTED_RESIDUAL_BLOCKS, lightweightnet_blocks

    if args.rounds < 1:
        raise ValueError(f"--rounds must be positive, got {args.rounds}")
    shapes = {
        "blocks": list(BENCHMARK_BLOCKS),
        "lightweightnet": lightweightnet_blocks(224),
        "lightweightnet32": lightweightnet_blocks(32),
        "inverted_residuals": list(INVERTED_RESIDUAL_BLOCKS),
    }[args.shapes]
    # The nine blocks back to back; for the benchmark blocks also LightweightNet's own nine at 224.
    chains = {"blocks": [("benchmark chain", list(BENCHMARK_BLOCKS)), ("chain (224 input)", lightweightnet_blocks(224))],
              "lightweightnet": [("chain (224 input)", lightweightnet_blocks(224))],
              "lightweightnet32": [("chain (32 input)", lightweightnet_blocks(32))],
              "inverted_residuals": []}[args.shapes]
    with_ort = _with_onnxruntime(args, device, dtype)
    providers = (["eager", "eager_channels_last"] + ([] if args.no_compile else ["compile"])
                 + (["onnxruntime"] if with_ort else []) + ["lwkernels"])
    pause = ROUND_PAUSE if args.pause is None else args.pause
    env = environment(device)
    if with_ort:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    print(f"lwkernels bench: {env['device']}, {device}, {args.dtype}, batch {batch}, "
          f"torch {env['torch']}, threads {env['threads']}" + (f", CPU path {env['cpu_path']}" if "cpu_path" in env else "")
          + (f", onnxruntime {env['onnxruntime']}" if with_ort else ""))

    # 1. Correctness on this machine, before any timing.
    failures = _check(shapes, device, dtype)
    if failures:
        for line in failures:
            print(f"MISMATCH {line}", file=sys.stderr)
        print("the fused block does not match the reference on this machine; not timing it", file=sys.stderr)
        return 1
    print(f"checked: fused == reference on all {len(shapes)} shapes")

    def timed(name: str, module, x, flops: int) -> Dict:
        reference = to_reference(module)
        fns = {p: make_provider(p, module, x, reference) for p in providers}
        if with_ort:  # ONNX Runtime's output is checked like the fused block's (on the timed input)
            err = _relative_error(fns["onnxruntime"](), reference, x)
            if not err <= _tolerance(dtype):
                raise _Mismatch(f"onnxruntime on {name}: max relative error {err:.3g} > {_tolerance(dtype):g}")
        times = medians(time_in_rounds(fns, args.min_time, args.rounds, pause,
                                       pools={p: thread_pool(p) for p in providers}, idle_cpu=args.idle_cpu))
        return _row(name, times, flops)

    # 2. Per-shape timings, then 3. the chains.
    rows: List[Dict] = []
    chain_rows: List[Dict] = []
    total = len(shapes) + len(chains)
    try:
        for i, shape in enumerate(shapes, 1):
            _progress(i, total, shape.name)
            rows.append(timed(shape.name, make_module(shape, dtype, device), make_input(shape, batch, dtype, device),
                              shape.flops(batch)))
        for j, (name, chain_shapes) in enumerate(chains, len(shapes) + 1):
            _progress(j, total, name)
            chain = JointChain(*(make_block(s, dtype, device, seed=k) for k, s in enumerate(chain_shapes)))
            chain_rows.append(timed(name, chain.eval(), make_input(chain_shapes[0], batch, dtype, device),
                                    sum(s.flops(batch) for s in chain_shapes)))
    except _Mismatch as e:
        _done_progress()
        print(f"MISMATCH {e}", file=sys.stderr)
        return 1
    _done_progress()

    # 4. The ceiling: no kernel computes the pointwise GEMM faster than torch.mm's rate.
    rate = matmul_rate(device, dtype, min_time=args.min_time)
    for shape, row in zip(shapes, rows):
        row["pointwise_floor_ms"] = shape.pointwise_flops(batch) / rate * 1e3
        row["max_speedup_vs_eager"] = row["ms"]["eager"] / row["pointwise_floor_ms"]

    _print_table(rows + chain_rows, providers)
    speedups = [r["speedup_vs_eager"] for r in rows]
    mean = geomean(speedups)
    ceiling = geomean([r["max_speedup_vs_eager"] for r in rows])
    print(f"geometric mean speedup over the {len(rows)} shapes: {mean:.2f}x "
          f"(slowest shape {min(speedups):.2f}x)")
    summary = {}
    if with_ort:
        vs_ort = [r["speedup_vs_onnxruntime"] for r in rows]
        summary["geomean_speedup_vs_onnxruntime"] = geomean(vs_ort)
        print(f"lwkernels / ONNX Runtime speed over the {len(rows)} shapes: geometric mean {geomean(vs_ort):.2f}x "
              f"(slowest shape {min(vs_ort):.2f}x); " + ", ".join(
                  f"{r['shape']} {r['speedup_vs_onnxruntime']:.2f}x" for r in chain_rows))
    print(f"ceiling: torch.mm runs at {rate / 1e9:.1f} GFLOP/s here; the pointwise GEMMs alone at that rate would be "
          f"{ceiling:.2f}x eager (geometric mean), so lwkernels reaches {mean / ceiling:.0%} of the reachable speedup")
    print(f"timing: medians of {args.rounds} rounds, min-time {args.min_time:g} s per provider and shape, "
          f"{pause:g} s pause where the thread pool changes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "batch": batch, "dtype": args.dtype, "device": device,
                       "timing": {"method": "rounds", "rounds": args.rounds, "min_time_s": args.min_time,
                                  "pause_s": pause, "idle_cpu": args.idle_cpu},
                       "rows": rows, "chain": chain_rows[-1] if chain_rows else None, "chains": chain_rows,
                       "shape_set": args.shapes, "geomean_speedup": mean,
                       **summary, "matmul_gflops": rate / 1e9, "ceiling_geomean_speedup": ceiling}, f, indent=2)
    return 0


class _Mismatch(Exception):
    pass


def _tolerance(dtype) -> float:
    import torch

    return {torch.float32: 1e-4, torch.float64: 1e-10}.get(dtype, 2e-2)


def _relative_error(got, reference, x) -> float:
    """Max |got - reference(x)| over max |reference(x)|, the reference evaluated in float64."""
    import copy

    import torch

    with torch.inference_mode():
        expected = copy.deepcopy(reference).double()(x.double())
    scale = expected.abs().max().item() or 1.0
    return (got.double() - expected).abs().max().item() / scale


def _check(shapes, device: str, dtype) -> List[str]:
    """Compare the fused block with the reference on a small batch of every shape."""
    import torch

    from ..bench.harness import make_input, make_module
    from ..nn.fuse import to_reference

    failures = []
    tol = _tolerance(dtype)
    for shape in shapes:
        block = make_module(shape, dtype, device)
        x = make_input(shape, 2, dtype, device)
        with torch.inference_mode():
            got = block(x)
        err = _relative_error(got, to_reference(block), x)
        if not err <= tol:  # also catches NaN
            failures.append(f"{shape.name}: max relative error {err:.3g} > {tol:g}")
    return failures


def _row(name: str, times: Dict[str, float], flops: int) -> Dict:
    fused = times["lwkernels"]
    row = {
        "shape": name,
        "ms": {p: t * 1e3 for p, t in times.items()},
        "speedup_vs_eager": times["eager"] / fused,
        "gflops": flops / fused / 1e9,
    }
    if "onnxruntime" in times:  # > 1: lwkernels faster than ONNX Runtime
        row["speedup_vs_onnxruntime"] = times["onnxruntime"] / fused
        row["onnxruntime_gflops"] = flops / times["onnxruntime"] / 1e9
    return row


def _print_table(rows: List[Dict], providers: List[str]) -> None:
    ort = "onnxruntime" in providers
    headers = ["shape"] + [f"{p} ms" for p in providers] + ["speedup", "GFLOP/s"] + (["vs ORT"] if ort else [])
    table = [[r["shape"]] + [f"{r['ms'][p]:.3f}" for p in providers] +
             [f"{r['speedup_vs_eager']:.2f}x", f"{r['gflops']:.1f}"] +
             ([f"{r['speedup_vs_onnxruntime']:.2f}x"] if ort else []) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in table)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    for line in table:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
    print("speedup = eager (PyTorch, NCHW, BN separate) / lwkernels; GFLOP/s of lwkernels (dw + pw multiply-adds x2)"
          + ("; vs ORT = onnxruntime / lwkernels (above 1: lwkernels faster)" if ort else ""))
