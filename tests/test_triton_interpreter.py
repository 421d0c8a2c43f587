"""The Triton kernels' logic tested without a GPU: tests/triton_interpreter_cases.py (the fused
inference kernel, against joint_block_reference) and tests/triton_train_interpreter_cases.py (the
training forward's kernels, against float64 compositions) under Triton's interpreter
(TRITON_INTERPRET=1), each file in its own process.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when lwkernels.triton.joint_block is
first imported, and this pytest process may already have imported it (or may later need the real
GPU compiler, for test_triton_gpu.py). So the interpreter cases run in a fresh pytest process with
the variable set; this process is left untouched. Its output is shown when it fails.

Runs in about a minute and a half on two CPU cores. Skipped when Triton is not installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import lwkernels  # noqa: E402

pytestmark = pytest.mark.interpreter

HERE = Path(__file__).resolve().parent
CASE_FILES = ("triton_interpreter_cases.py", "triton_train_interpreter_cases.py")
TIMEOUT_S = 900


@pytest.mark.parametrize("cases", CASE_FILES)
def test_kernel_in_the_interpreter(cases):
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    # The child imports the same lwkernels as this process (source tree or installed package).
    package_root = str(Path(lwkernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "pytest", str(HERE / cases), "-q", "-rfE", "-p", "no:cacheprovider",
           "-o", "addopts=", "--rootdir", str(HERE.parent)]
    try:
        proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"interpreter tests did not finish in {TIMEOUT_S} s:\n{out[-5000:]}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter tests failed ({' '.join(cmd)}):\n{output[-20000:]}"
    summary = output.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, f"unexpected summary: {summary}"
