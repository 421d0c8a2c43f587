"""The CPU speed targets against ONNX Runtime, measured by their acceptance protocol.

    python benchmarks/ort_acceptance.py --runs 3 --out benchmarks/results/ort-acceptance-<cpu>.json

Each run is one `lwkernels bench` process (providers take turns in rounds with pauses between thread
pools: docs/benchmarking.md; ONNX Runtime with default session options and as many intra-op threads
as PyTorch), and the runs of one workload are not back to back: every workload's first run, then
every workload's second, ... The median over runs of each run's medians decides. Workloads:

    blocks b1      the nine benchmark blocks and the benchmark chain, batch 1 (`lwkernels bench`)
    chain b8       the benchmark chain at batch 8 (`lwkernels bench --batch 8`)
    lightweightnet b1 / b8, mobilenetv1 b1 / b8   whole models at 224 (`lwkernels bench --model`)
    inverted residuals b1 / b8   MobileNetV2's inverted residuals (`--shapes inverted_residuals`)
    mobilenet_v2 b1 / b8, mnasnet1_0 b1 / b8   torchvision's models against fuse() of them
                   (`--model torchvision:NAME`, with torch.compile; needs torchvision: not default)

Prints a table of lwkernels / ONNX Runtime speed per workload (above 1: lwkernels faster) with the
targets of the CPU speed issue, and writes every run's JSON plus the medians to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

TARGETS = {"blocks geomean": 1.05, "slowest block": 0.95, "chain b1": 1.05, "chain b8": 1.05,
           "lightweightnet b1": 1.1, "lightweightnet b8": 1.1, "mobilenetv1 b1": 1.1, "mobilenetv1 b8": 1.1,
           "mobilenet_v2 b1": 1.1, "mobilenet_v2 b8": 1.1, "mnasnet1_0 b1": 1.1, "mnasnet1_0 b8": 1.1}

WORKLOADS = {
    "blocks b1": ["--no-compile", "--min-time", "1", "--rounds", "5"],
    "chain b8": ["--no-compile", "--batch", "8", "--min-time", "2", "--rounds", "5", "--shapes", "blocks"],
    "lightweightnet b1": ["--no-compile", "--model", "lightweightnet", "--batch", "1", "--min-time", "3"],
    "lightweightnet b8": ["--no-compile", "--model", "lightweightnet", "--batch", "8", "--min-time", "3"],
    "mobilenetv1 b1": ["--no-compile", "--model", "mobilenetv1", "--batch", "1", "--min-time", "3"],
    "mobilenetv1 b8": ["--no-compile", "--model", "mobilenetv1", "--batch", "8", "--min-time", "3"],
    "inverted residuals b1": ["--no-compile", "--shapes", "inverted_residuals", "--min-time", "1"],
    "inverted residuals b8": ["--no-compile", "--shapes", "inverted_residuals", "--batch", "8", "--min-time", "1"],
}
#: Need torchvision (its own environment); run with --workloads.
TORCHVISION_WORKLOADS = {
    f"{name} b{batch}": ["--model", f"torchvision:{name}", "--batch", str(batch), "--min-time", "3"]
    for name in ("mobilenet_v2", "mnasnet1_0") for batch in (1, 8)
}


def _run(args: List[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.json")
        subprocess.run([sys.executable, "-m", "lwkernels.cli.main", "bench", *args, "--json", path],
                       check=True, stdout=subprocess.DEVNULL, timeout=timeout)
        with open(path) as f:
            return json.load(f)


def _ratios(name: str, result: dict) -> Dict[str, float]:
    """lwkernels / ONNX Runtime speed of the quantities this workload decides."""
    if name == "blocks b1":
        per_block = [r["speedup_vs_onnxruntime"] for r in result["rows"]]
        bench_chain = next(c for c in result["chains"] if c["shape"] == "benchmark chain")
        return {"blocks geomean": result["geomean_speedup_vs_onnxruntime"], "slowest block": min(per_block),
                "chain b1": bench_chain["speedup_vs_onnxruntime"]}
    if name == "chain b8":
        bench_chain = next(c for c in result["chains"] if c["shape"] == "benchmark chain")
        return {"chain b8": bench_chain["speedup_vs_onnxruntime"]}
    if name.startswith("inverted residuals"):
        per_block = [r["speedup_vs_onnxruntime"] for r in result["rows"]]
        return {f"{name} geomean": result["geomean_speedup_vs_onnxruntime"], f"{name} slowest": min(per_block)}
    rows = {r["provider"]: r for r in result["rows"]}
    ratios = {name: rows["lwkernels"]["vs_onnxruntime"]}
    if "compile" in rows:  # lwkernels / torch.compile speed
        ratios[f"{name} vs compile"] = rows["compile"]["median_ms"] / rows["lwkernels"]["median_ms"]
    return ratios


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS),
                   choices=list(WORKLOADS) + list(TORCHVISION_WORKLOADS))
    p.add_argument("--pause", type=float, default=2.0, help="seconds of idle between runs")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a run may take")
    p.add_argument("--out", default=None, help="write every run and the medians here (JSON)")
    args = p.parse_args(argv)

    runs: Dict[str, List[dict]] = {w: [] for w in args.workloads}
    for i in range(args.runs):
        for name in args.workloads:
            time.sleep(args.pause)
            runs[name].append(_run({**WORKLOADS, **TORCHVISION_WORKLOADS}[name], args.timeout))
            print(f"run {i + 1}/{args.runs}: {name} done", file=sys.stderr)

    values: Dict[str, List[float]] = {}
    for name, results in runs.items():
        for result in results:
            for key, value in _ratios(name, result).items():
                values.setdefault(key, []).append(value)
    medians = {key: statistics.median(v) for key, v in values.items()}
    env = next(iter(runs.values()))[0]["environment"]
    print(f"lwkernels / ONNX Runtime speed, median of {args.runs} runs ({env.get('device', '')}, {env.get('cpu_path', '')} path, {env.get('threads', '')} threads):")
    print(f"{'quantity':<28} {'median':>7} {'target':>7}   runs")
    for key, value in medians.items():
        target = TARGETS.get(key)
        mark = "" if target is None else ("met" if value >= target else "not met")
        runs_text = " ".join(f"{v:.2f}" for v in values[key])
        target_text = f"{target:>6.2f}x" if target is not None else " " * 7
        print(f"{key:<28} {value:>6.2f}x {target_text}   {runs_text}   {mark}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "runs": args.runs, "medians": medians, "values": values,
                       "targets": TARGETS, "results": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
