"""Do the timing methods agree? lwkernels vs ONNX Runtime (and PyTorch eager) on the chain and the
whole models, timed three ways:

    rounds     one process, providers taking turns in rounds with pauses (harness.time_in_rounds,
               what `lwkernels bench` uses)
    processes  one process per provider, the processes alternated (each times one provider alone)
    calls      one process, providers alternating call by call: the pitfall, shown for contrast
               (each engine's spinning threads slow the other)

    python benchmarks/ort_timing_methods.py --batch 1 8 --json out.json

Prints one Markdown table row per workload and batch: medians (ms) and the lwkernels / ONNX Runtime
speed (ORT median over lwkernels median; above 1 is lwkernels faster) by each method."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

#: --idle-cpu: wait for other processes' load to fall below this before each turn.
IDLE_CPU: Optional[float] = None
#: Threads of both engines, passed on to the worker processes.
THREADS = 0
#: The fastest call of each provider by the rounds method, per workload (a load-resistant floor).
BEST: Dict[str, Dict[str, float]] = {}


def _providers(workload, names):
    from lwkernels.bench.harness import make_provider

    return {p: make_provider(p, workload.fused, workload.x, workload.reference) for p in names}


def by_rounds(workload, names, min_time: float, rounds: int) -> Dict[str, float]:
    from lwkernels.bench.harness import thread_pool, time_in_rounds

    fns = _providers(workload, names)
    for fn in fns.values():
        fn()
    times = time_in_rounds(fns, min_time, rounds, pools={p: thread_pool(p) for p in fns}, idle_cpu=IDLE_CPU)
    BEST[workload.description] = {p: min(t) for p, t in times.items()}
    return {p: statistics.median(t) for p, t in times.items()}


def by_calls(workload, names, min_time: float, rounds: int) -> Dict[str, float]:
    from lwkernels.bench.harness import wait_for_idle_cpu

    fns = _providers(workload, names)
    times: Dict[str, List[float]] = {p: [] for p in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        if IDLE_CPU is not None:
            wait_for_idle_cpu(IDLE_CPU)
        start = time.perf_counter()
        while time.perf_counter() - start < min_time * len(fns) / rounds:
            for p, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[p].append(time.perf_counter() - t0)
    return {p: statistics.median(t) for p, t in times.items()}


def by_processes(workload_name: str, batch: int, names, min_time: float, rounds: int,
                 repeats: int) -> Dict[str, float]:
    results: Dict[str, List[float]] = {p: [] for p in names}
    for r in range(repeats):
        for p in (names if r % 2 == 0 else names[::-1]):
            out = subprocess.run([sys.executable, __file__, "--worker", workload_name, str(batch), p,
                                  "--min-time", str(min_time), "--rounds", str(rounds), "--threads", str(THREADS)]
                                 + ([] if IDLE_CPU is None else ["--idle-cpu", str(IDLE_CPU)]),
                                 capture_output=True, text=True, check=True)
            results[p].append(float(out.stdout.strip().splitlines()[-1]))
    return {p: statistics.median(t) for p, t in results.items()}


def _worker(workload_name: str, batch: int, provider: str, min_time: float, rounds: int) -> None:
    from lwkernels.bench.harness import medians, time_in_rounds
    from lwkernels.bench.workloads import build_workload

    w = build_workload(workload_name, batch)
    fns = _providers(w, [provider])
    for _ in range(3):
        fns[provider]()
    print(medians(time_in_rounds(fns, min_time, rounds, idle_cpu=IDLE_CPU, max_calls=100_000))[provider])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["chain", "lightweightnet", "mobilenetv1"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per provider")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--process-repeats", type=int, default=3, help="processes per provider")
    p.add_argument("--idle-cpu", type=float, default=None,
                   help="before each turn wait until other processes keep the CPUs at most this busy (0-1)")
    p.add_argument("--threads", type=int, default=None, help="threads for both engines (default: torch's)")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", nargs=3, metavar=("WORKLOAD", "BATCH", "PROVIDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global IDLE_CPU, THREADS
    IDLE_CPU = args.idle_cpu
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    THREADS = torch.get_num_threads()
    if args.worker:
        _worker(args.worker[0], int(args.worker[1]), args.worker[2], args.min_time, args.rounds)
        return 0

    import onnxruntime

    from lwkernels.bench.harness import environment
    from lwkernels.bench.workloads import build_workload

    env = dict(environment("cpu"), onnxruntime=onnxruntime.__version__)
    print(f"{env['device']}, CPU path {env['cpu_path']}, threads {torch.get_num_threads()}, torch {env['torch']}, "
          f"onnxruntime {env['onnxruntime']}")
    print("| workload | batch | eager ms (rounds) | lwkernels ms: rounds / processes / calls "
          "| ORT ms: rounds / processes / calls | lwkernels / ORT: rounds / processes / calls |")
    print("|---|---:|---:|---|---|---|")
    rows = []
    for name in args.workloads:
        for batch in args.batch:
            w = build_workload(name, batch)
            rounds = by_rounds(w, ["eager", "onnxruntime", "lwkernels"], args.min_time, args.rounds)
            calls = by_calls(w, ["onnxruntime", "lwkernels"], args.min_time, args.rounds)
            procs = by_processes(name, batch, ["onnxruntime", "lwkernels"], args.min_time, args.rounds,
                                 args.process_repeats)
            row = {"workload": name, "batch": batch, "rounds": rounds, "processes": procs, "calls": calls,
                   "rounds_fastest_call": BEST[w.description]}
            rows.append(row)
            ms = {m: {k: v * 1e3 for k, v in row[m].items()} for m in ("rounds", "processes", "calls")}
            ratio = {m: row[m]["onnxruntime"] / row[m]["lwkernels"] for m in ("rounds", "processes", "calls")}
            row["lwkernels_vs_onnxruntime"] = ratio
            print(f"| {name} | {batch} | {ms['rounds']['eager']:.2f} | "
                  + " / ".join(f"{ms[m]['lwkernels']:.2f}" for m in ("rounds", "processes", "calls")) + " | "
                  + " / ".join(f"{ms[m]['onnxruntime']:.2f}" for m in ("rounds", "processes", "calls")) + " | "
                  + " / ".join(f"{ratio[m]:.2f}x" for m in ("rounds", "processes", "calls")) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "min_time_s": args.min_time, "rounds": args.rounds,
                       "idle_cpu": args.idle_cpu,
                       "process_repeats": args.process_repeats, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
