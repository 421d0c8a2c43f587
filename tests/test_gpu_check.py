"""benchmarks/gpu_check.py without a GPU: --dry-run plans every part, runs the parts that need no
CUDA (versions, an offline compilation for sm_90), checks that each part's script parses its
arguments, and writes the result files; bad arguments get a clear error."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args, timeout=300):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_writes_the_result_files(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "check"
    proc = _run("--out", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert {"gpu_check.json", "gpu_check.md", "env.log", "tests.log", "bench.log"} <= set(files), files
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["meta"]["mode"] == "dry-run"
    parts = result["parts"]
    assert list(parts) == ["env", "prepare", "tests", "memcheck", "bench", "train"]
    assert parts["env"]["status"] == "passed", (out / "env.log").read_text()
    assert all(parts[name]["status"] == "dry-run" for name in list(parts)[1:]), parts
    assert "resident warps per SM" in (out / "env.log").read_text()
    assert "--dtypes" not in parts["bench"]["command"]  # the full run measures every dtype
    summary = (out / "gpu_check.md").read_text()
    assert "| tests | dry-run |" in summary and "| env | passed |" in summary
    assert re.search(r"[1-9]\d* tests collected", parts["tests"]["summary"]), parts["tests"]


def test_quick_plan_is_smaller(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "quick"
    proc = _run("--out", str(out), "--dry-run", "--parts", "tests", "bench", "prepare")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    full = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert set(full) == {"prepare", "tests", "bench"}
    assert "--build-into" in full["prepare"]["command"] and "--warm-jobs 0" in full["bench"]["command"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    quick = {p.name: p for p in gpu_check.plan(gpu_check.parse_args(["--out", str(out), "--quick"]), tmp_path)}
    assert "--build-into" not in quick["prepare"].command
    assert quick["bench"].command[-5:] == quick["prepare"].command[-5:]  # prepare compiles what bench times
    assert "not slow" in quick["tests"].command and quick["tests"].env["LWKERNELS_GPU_GRID"] == "quick"
    for mode in ("full", "quick"):  # env, then the side-by-side parts, then the timing parts one by one
        limits = gpu_check.LIMITS[mode]
        worst = limits["env"] + max(limits[n] for n in gpu_check.PHASES[0]) + sum(limits[n] for n in gpu_check.PHASES[1])
        assert worst <= gpu_check.BUDGET[mode], (mode, worst)


def test_out_must_be_a_directory(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("")
    proc = _run("--out", str(target), "--dry-run", timeout=60)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


@pytest.mark.interpreter
def test_memcheck_cases_pass_in_the_interpreter():
    """The memcheck part's shapes and checks, run by Triton's interpreter on the CPU: the script
    works, and every kernel handles those border-heavy shapes with the tiles autotuning may pick."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_memcheck_cases.py"), "--device", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and ", 0 failed" in proc.stdout, proc.stdout[-5000:] + proc.stderr[-5000:]
