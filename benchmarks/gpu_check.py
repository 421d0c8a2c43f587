"""The whole GPU check as one command, for a machine lent with a GPU for a few minutes.

    python benchmarks/gpu_check.py --out DIR            # everything, about 6 minutes of wall time
    python benchmarks/gpu_check.py --out DIR --quick    # a short rerun, about 2 minutes
    python benchmarks/gpu_check.py --out DIR --dry-run  # no CUDA: the plan, the static checks, the files

Parts, each a subprocess with its own time limit (one failing or timing out never stops the others):

    env       versions, the device, and one offline compilation for sm_90 (no GPU needed)
    prepare   (full run) pip install --no-build-isolation --no-deps --no-index into a scratch
              directory and import the C++ extension from there (no network); the GPU parts run from
              this source tree, as they need no C++ extension. Meanwhile compile every Triton kernel
              the bench and train parts will autotune or launch, in parallel processes, into
              Triton's on-disk cache, so those parts time kernels instead of compiling them
    tests     tests/test_triton_gpu.py and tests/test_triton_train_gpu.py (the grid sized by
              LWKERNELS_GPU_GRID; in parallel workers when pytest-xdist is installed; --quick
              leaves out the tests that compile dozens of kernels each)
    memcheck  compute-sanitizer memcheck on border-heavy shapes (benchmarks/gpu_memcheck_cases.py)
    bench     microbenchmarks + roofline (benchmarks/gpu_bench.py), alone on the GPU
    train     one training step of the nine-block chain, batch 128 fp16, with peak memory
              (benchmarks/gpu_train_step.py), alone on the GPU

prepare, tests and memcheck run side by side (correctness); bench and train run after them, one at
a time (timing). DIR receives at most 8 files: gpu_check.json (everything measured), gpu_check.md
(the summary) and one log per part (env.log, prepare.log, tests.log, memcheck.log, bench.log,
train.log).
The exit status is 0 when every part that ran passed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

#: Wall-time budgets (seconds) of the whole run, and of each part in it.
BUDGET = {"full": 360, "quick": 120}
LIMITS = {
    # On the H200 (16 cores) the tests did not finish in 150 s beside prepare's compilations (about a
    # dozen slow ones left) and memcheck took ~150 s (the sanitizer slows autotuning's timing runs).
    # 360 s in all still leaves a 15-minute lease room for a machine start and a rerun.
    "full": {"env": 15, "prepare": 210, "tests": 210, "memcheck": 210, "bench": 95, "train": 35},
    "quick": {"env": 10, "prepare": 40, "tests": 40, "memcheck": 35, "bench": 50, "train": 20},
}
#: Seconds a timing part keeps back from its limit to write its results after its deadline.
WRITE_MARGIN = 12
PART_ORDER = ("env", "prepare", "tests", "memcheck", "bench", "train")
#: Parts that share the machine (phase 1) and parts that time it alone, one after another (phase 2).
PHASES = (("prepare", "tests", "memcheck"), ("bench", "train"))


@dataclass
class Part:
    name: str
    command: List[str]
    limit_s: float
    env: Dict[str, str] = field(default_factory=dict)
    json_out: Optional[Path] = None
    needs_cuda: bool = True
    status: str = "planned"  # planned, passed, failed, timed out, skipped, dry-run
    returncode: Optional[int] = None
    seconds: float = 0.0
    summary: str = ""
    result: Optional[dict] = None

    def record(self) -> dict:
        return {"command": " ".join(self.command), "limit_s": self.limit_s, "status": self.status,
                "returncode": self.returncode, "seconds": round(self.seconds, 1), "summary": self.summary,
                "result": self.result}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the results (created if absent)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the short rerun (about 2 minutes)")
    mode.add_argument("--dry-run", action="store_true", help="no CUDA: plan, static checks and files only")
    p.add_argument("--parts", nargs="+", choices=PART_ORDER, default=list(PART_ORDER),
                   help="run only these parts")
    p.add_argument("--jobs", type=int, default=0, help="parallel test / compile workers (0: from the CPU count)")
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a directory")
    return args


def _workers(requested: int) -> int:
    return requested if requested > 0 else max(1, min(12, (os.cpu_count() or 2) - 2))


def plan(args, scratch: Path) -> List[Part]:
    """The parts to run, with their commands, environments and time limits."""
    mode = "quick" if args.quick else "full"
    limits = LIMITS[mode]
    py = sys.executable
    jobs = _workers(args.jobs)
    # What the bench part measures, so that prepare compiles exactly its Triton candidates.
    bench_what = (["--dtypes", "fp16", "--no-compile", "--providers", "eager_channels_last", "lwkernels_channels_last"]
                  if mode == "quick" else [])
    prepare = [py, str(BENCH / "gpu_check.py"), "--prepare", "--warm-json", str(scratch / "warm.json")]
    if mode == "full":
        prepare += ["--build-into", str(scratch / "site")]
    parts = [
        Part("env", [py, str(BENCH / "gpu_check.py"), "--report-env"], limits["env"], needs_cuda=False),
        Part("prepare", prepare + ["--", "--warm-jobs", str(jobs), "--warm-train-dtype", "fp16"] + bench_what,
             limits["prepare"],
             env={"CMAKE_BUILD_PARALLEL_LEVEL": str(max(2, jobs // 2))}, json_out=scratch / "warm.json"),
    ]
    tests = [py, "-m", "pytest", "tests/test_triton_gpu.py", "tests/test_triton_train_gpu.py", "-v", "--tb=short",
             "-rfE", "--durations=15", "-p", "no:cacheprovider", "-o", "addopts="]
    if _has_module("xdist") and jobs > 1:
        tests += ["-n", str(jobs)]
    if mode == "quick":
        # the tests that compile dozens of kernels each: the full run's job
        tests += ["-m", "not slow", "-k", "not torch_compile and not compiled_training and not every_autotune_candidate"
                  " and not random_shapes and not benchmark_shapes"]
    parts.append(Part("tests", tests, limits["tests"], env={"LWKERNELS_GPU_GRID": mode}))
    sanitizer = shutil.which("compute-sanitizer") or "compute-sanitizer"
    parts.append(Part("memcheck", [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", py,
                                   str(BENCH / "gpu_memcheck_cases.py")], limits["memcheck"],
                      env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
    bench_json = scratch / "bench.json"
    warmed = "prepare" in args.parts
    bench = [py, str(BENCH / "gpu_bench.py"), "--json", str(bench_json), "--deadline",
             str(limits["bench"] - WRITE_MARGIN), "--warm-jobs", "0" if warmed else str(jobs)] + bench_what
    parts.append(Part("bench", bench, limits["bench"], json_out=bench_json))
    train_json = scratch / "train.json"
    train = [py, str(BENCH / "gpu_train_step.py"), "--json", str(train_json), "--deadline",
             str(limits["train"] - WRITE_MARGIN)]
    if mode == "quick":  # the layouts prepare compiled the training kernels for
        train += ["--providers", "eager_channels_last", "lwkernels_channels_last"]
    parts.append(Part("train", train, limits["train"], json_out=train_json))
    return [p for p in parts if p.name in args.parts and p.limit_s > 0]


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _child_env(extra: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the real compiler, never the interpreter
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


def start(part: Part, log: Path) -> Optional[subprocess.Popen]:
    """Start the part's command with its output going to its log; None when it cannot start (a
    missing program), which is then recorded as the part's failure."""
    handle = log.open("w")
    handle.write(f"$ {' '.join(part.command)}\n(limit {part.limit_s:.0f} s)\n\n")
    handle.flush()
    try:
        # A session of its own, so a timeout ends the part's whole process tree (pytest workers,
        # the sanitizer's target, compile workers), and nothing else.
        proc = subprocess.Popen(part.command, cwd=ROOT, env=_child_env(part.env), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        handle.write(f"[gpu_check] could not start: {e}\n")
        handle.close()
        part.status, part.summary = "failed", f"could not start: {e}"
        return None
    proc._log_handle = handle  # type: ignore[attr-defined]
    proc._started = time.time()  # type: ignore[attr-defined]
    return proc


def finish(part: Part, proc: Optional[subprocess.Popen], log: Path, deadline: float) -> None:
    if proc is None:  # did not start; start() recorded why
        return
    try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
        part.returncode = proc.returncode
        part.status = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        part.returncode = proc.returncode
        part.status = "timed out"
    part.seconds = time.time() - proc._started  # type: ignore[attr-defined]
    proc._log_handle.close()  # type: ignore[attr-defined]
    if part.status == "timed out":
        with log.open("a") as f:
            f.write(f"\n[gpu_check] killed after {part.seconds:.0f} s (limit {part.limit_s:.0f} s)\n")
    if part.json_out is not None and part.json_out.exists():
        try:
            part.result = json.loads(part.json_out.read_text())
        except ValueError as e:
            part.summary = f"unreadable results: {e}"
    part.summary = part.summary or summarize(part, log.read_text(errors="replace"))


def summarize(part: Part, log: str) -> str:
    """One line for the summary table."""
    if part.name == "tests":
        lines = [ln for ln in log.splitlines() if re.search(r"\b(passed|failed|error|no tests ran)\b", ln)]
        if lines:
            return lines[-1].strip("= ")
        # killed before pytest's summary: count the verbose per-test lines
        counts = {w: len(re.findall(rf"\b{w}\b", log)) for w in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        return "no summary; so far " + ", ".join(f"{n} {w.lower()}" for w, n in counts.items())
    if part.name == "bench" and part.result:
        return bench_headline(part.result)
    if part.name == "train" and part.result:
        rows = [r for r in part.result.get("rows", []) if "speedup_vs_eager" in r]
        return "; ".join(f"{r['provider']}: {r['speedup_vs_eager']:.2f}x eager, peak {r['peak_vs_eager']:.0%} of eager's"
                         for r in rows) or "no complete comparison"
    tail = [ln for ln in log.splitlines() if ln.strip()]
    return tail[-1][:200] if tail else ""


def _geomean(values: List[float]) -> float:
    import math

    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def bench_headline(result: dict) -> str:
    rows = [r for r in result.get("rows", []) if "time_ms" in r]
    out = []
    for dtype in ("fp16", "bf16", "fp32"):
        ours = [r for r in rows if r["dtype"] == dtype and r["provider"] == "lwkernels_channels_last"
                and not r["shape"].startswith("chain")]
        if not ours:
            continue
        speed = [r["speedup_vs_eager_channels_last"] for r in ours if "speedup_vs_eager_channels_last" in r]
        pct = sorted(r["roofline_pct"] for r in ours)
        out.append(f"{dtype}: {_geomean(speed):.2f}x eager channels_last (geomean of {len(speed)}), "
                   f"roofline {pct[0]:.0f}-{pct[-1]:.0f}%")
    chain = [r for r in rows if r["shape"].startswith("chain") and r["provider"] == "lwkernels_channels_last"
             and "speedup_vs_compile" in r]
    out += [f"chain {r['dtype']}: {r['speedup_vs_compile']:.2f}x torch.compile" for r in chain]
    return "; ".join(out) or "no lwkernels rows"


def markdown(parts: List[Part], meta: dict) -> str:
    lines = [f"# GPU check, {meta['mode']} ({meta['date_utc']} UTC)", "",
             f"Host Python {meta['python']}; wall time {meta['seconds']:.0f} s of a {meta['budget_s']} s budget.", "",
             "| part | status | seconds (limit) | summary |", "|---|---|---:|---|"]
    for p in parts:
        lines.append(f"| {p.name} | {p.status} | {p.seconds:.0f} ({p.limit_s:.0f}) | {p.summary} |")
    bench = next((p.result for p in parts if p.name == "bench" and p.result), None)
    if bench:
        env = bench.get("environment", {})
        lines += ["", f"## Microbenchmarks on {env.get('device', '?')}", "",
                  f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN "
                  f"{env.get('cudnn')}; copy bandwidth {bench['copy_bandwidth_gbytes_per_s']:.0f} GB/s; matmul "
                  + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in bench["matmul_tflops"].items()) + ".", "",
                  "| shape | dtype | provider | ms | % of roofline | vs eager channels_last | vs compile |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in bench["rows"]:
            if "time_ms" not in r:
                lines.append(f"| {r['shape']} | {r['dtype']} | {r['provider']} | error | | | |")
                continue
            vs_cl = f"{r['speedup_vs_eager_channels_last']:.2f}x" if "speedup_vs_eager_channels_last" in r else ""
            vs_c = f"{r['speedup_vs_compile']:.2f}x" if "speedup_vs_compile" in r else ""
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['time_ms']:.3f} | "
                         f"{r['roofline_pct']:.1f} | {vs_cl} | {vs_c} |")
        if bench.get("skipped"):
            lines += ["", f"Skipped at the deadline: {len(bench['skipped'])} measurements."]
    train = next((p.result for p in parts if p.name == "train" and p.result), None)
    if train:
        lines += ["", f"## Training step ({train['model']}, batch {train['batch']}, {train['dtype']})", "",
                  "| provider | ms | peak MiB | vs eager |", "|---|---:|---:|---:|"]
        for r in train["rows"]:
            if "time_ms" in r:
                vs = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else ""
                lines.append(f"| {r['provider']} | {r['time_ms']:.2f} | {r['peak_step_bytes'] / 2**20:.0f} | {vs} |")
            else:
                lines.append(f"| {r['provider']} | error | | |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    mode = "dry-run" if args.dry_run else ("quick" if args.quick else "full")
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    budget = BUDGET["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        parts = plan(args, Path(tmp))
        logs = {p.name: args.out / f"{p.name}.log" for p in parts}
        if args.dry_run:
            dry_run(parts, logs)
        else:
            for p in [q for q in parts if q.name == "env"]:
                finish(p, start(p, logs[p.name]), logs[p.name], time.time() + p.limit_s)
            side_by_side = [(p, start(p, logs[p.name]), time.time() + p.limit_s) for p in parts if p.name in PHASES[0]]
            for p, proc, deadline in side_by_side:
                finish(p, proc, logs[p.name], deadline)
            for p in [q for q in parts if q.name in PHASES[1]]:  # timing: alone, one after another
                finish(p, start(p, logs[p.name]), logs[p.name], time.time() + p.limit_s)
        meta = {"mode": mode, "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                "python": sys.version.split()[0], "budget_s": budget, "seconds": time.time() - began,
                "root": ROOT.name}
        result = {"meta": meta, "parts": {p.name: p.record() for p in parts}}
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "gpu_check.md").write_text(markdown(parts, meta))
    print(f"gpu_check ({mode}) in {time.time() - began:.0f} s; results in {args.out}")
    for p in parts:
        print(f"  {p.name:<9} {p.status:<10} {p.seconds:5.0f} s  {p.summary}")
    return 0 if all(p.status in ("passed", "dry-run", "skipped") for p in parts) else 1


def dry_run(parts: List[Part], logs: Dict[str, Path]) -> None:
    """Everything that needs no CUDA: the env part runs (versions and an offline compilation), the
    tests part collects its tests, the other parts' scripts are checked to parse their arguments
    (--help), and every part's plan is logged."""
    for p in parts:
        if p.name == "env":
            finish(p, start(p, logs[p.name]), logs[p.name], time.time() + p.limit_s)
            continue
        if p.name == "tests":  # collect the tests exactly as planned (the grid size included)
            check = list(p.command)
            if "-n" in check:  # no xdist workers for a collection
                del check[check.index("-n"):check.index("-n") + 2]
            check += ["--collect-only", "-q"]
            script = "pytest"
        else:
            script = next(c for c in p.command if c.endswith(".py"))
            check = [sys.executable, script] + (["--prepare"] if "--prepare" in p.command else []) + ["--help"]
        proc = subprocess.run(check, cwd=ROOT, env=_child_env(p.env), capture_output=True, text=True, timeout=120)
        ok = proc.returncode == 0
        logs[p.name].write_text(f"dry run: would run (limit {p.limit_s:.0f} s, env {p.env}):\n$ {' '.join(p.command)}\n\n"
                                f"$ {' '.join(check)}  -> exit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        p.status = "dry-run" if ok else "failed"
        p.returncode = proc.returncode
        if p.name == "tests":
            collected = re.findall(r"(\d+) tests? collected", proc.stdout)
            p.summary = (f"{collected[-1] if collected else '?'} tests collected; not run (needs CUDA)" if ok
                         else "pytest --collect-only failed")
        else:
            p.summary = "arguments parse; not run (needs CUDA)" if ok else f"{script} --help failed"


# -- the env and prepare parts (run by this script in a subprocess) ---------------------------------

def report_env() -> int:
    import platform

    import torch

    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError as e:
        print(f"triton not importable: {e}")
        return 1
    print(f"cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"device {i}: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                  f"{props.multi_processor_count} SMs")
    for tool in ("nvidia-smi", "compute-sanitizer", "ncu"):
        print(f"{tool}: {shutil.which(tool) or 'not on PATH'}")
    for module in ("xdist", "pytest_benchmark", "hypothesis"):
        print(f"python module {module}: {'present' if _has_module(module) else 'absent'}")
    from lwkernels.triton.offline import compile_joint_block, resources

    started = time.time()
    r = resources(compile_joint_block("fp16", 90, "tf32", (64, 128, 32, 1), channels_last=True))
    print(f"offline compilation for sm_90 (64x128x32 fp16 channels_last) in {time.time() - started:.1f} s: "
          f"{r.registers} registers, {r.stack_bytes} B stack, {r.resident_warps} resident warps per SM")
    return 0


def prepare(argv: List[str]) -> int:
    """The prepare part: compile the bench part's Triton candidates (gpu_bench.py --warm-only with
    the arguments after "--") and, meanwhile, build the package (when --build-into is given)."""
    p = argparse.ArgumentParser(prog="gpu_check.py --prepare")
    p.add_argument("--build-into", type=Path, help="pip install the package into this directory first")
    p.add_argument("--warm-json", type=Path, required=True)
    p.add_argument("warm_args", nargs="*", help="gpu_bench.py arguments (after --)")
    args = p.parse_args(argv)
    warm = [sys.executable, str(BENCH / "gpu_bench.py"), "--warm-only", "--json", str(args.warm_json), *args.warm_args]
    print("$ " + " ".join(warm), flush=True)
    warming = subprocess.Popen(warm, cwd=ROOT)  # the bench part depends on it: start it first
    rc = 0
    if args.build_into is not None:  # meanwhile, on the remaining cores
        rc = build_into(args.build_into)
        print(f"[prepare] build exit status {rc}", flush=True)
    warm_rc = warming.wait()
    print(f"[prepare] Triton candidates compiled, exit status {warm_rc}", flush=True)
    return max(rc, warm_rc)


def build_into(target: Path) -> int:
    """pip install the package into `target` without network or build isolation, then import its
    C++ extension from there in a fresh interpreter."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
           "--target", str(target), str(ROOT)]
    print("$ " + " ".join(cmd), flush=True)
    started = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    print(f"[prepare] pip install took {time.time() - started:.0f} s", flush=True)
    if rc != 0:
        return rc
    env = dict(os.environ, PYTHONPATH=str(target))
    check = "import lwkernels, lwkernels._C; print('built', lwkernels.__file__, lwkernels.selected_isa())"
    return subprocess.call([sys.executable, "-c", check], cwd=str(target), env=env)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--report-env"]:
        return report_env()
    if argv[:1] == ["--prepare"]:
        return prepare(argv[1:])
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
