"""How the CPU kernels run their threads (csrc/parallel.h): on PyTorch's own OpenMP team when its
runtime is loaded (the default), or on lwkernels' thread pool. The backend decides which thread
computes a piece of work, never what is computed; a forked child (a DataLoader worker) must still
compute, as the parent's OpenMP team does not exist there. The op and training tests that run on
several threads take the `parallel_backend` fixture (conftest.py) and so run on both."""
from __future__ import annotations

import multiprocessing
import os
import sys

import numpy as np
import pytest
import torch

import lwkernels.cpu.backend as cpu_backend
from helpers import (Case, call_op, host_openmp_loaded, make_args, reference64, run_python, torch_threads,
                     tolerance)
from lwkernels.models import LightweightNet


def test_default_is_pytorchs_openmp_team():
    """With PyTorch's OpenMP runtime loaded (every Linux build of PyTorch 2.x ships one), the
    automatic choice runs the kernels on it."""
    if "OpenMP" not in torch.__config__.parallel_info() or not sys.platform.startswith("linux"):
        pytest.skip("this PyTorch build has no OpenMP runtime, or the platform cannot find it")
    in_use = cpu_backend.parallel_backend_in_use()
    assert in_use.startswith("openmp (lib") and "/" not in in_use, in_use


def test_bad_choices_are_named():
    with pytest.raises(ValueError, match="'fibers' is not a parallel backend; choose one of"):
        cpu_backend.set_parallel_backend("fibers")
    assert cpu_backend.set_parallel_backend(" ThreadPool ") == "threadpool"
    cpu_backend.set_parallel_backend("auto")


def test_bad_environment_value_is_named(tmp_path):
    code = ("import torch, lwkernels, lwkernels.cpu.backend as b\n"
            "try:\n    b.native()\nexcept ValueError as e:\n    print('ERROR', e)\n")
    out = run_python(["-c", code], cwd=tmp_path, env={cpu_backend.PARALLEL_ENV: "fibers"})
    assert "ERROR LWKERNELS_CPU_PARALLEL='fibers' is not a parallel backend" in out.stdout, out


def test_environment_chooses_the_thread_pool(tmp_path):
    code = "import torch, lwkernels.cpu.backend as b\nprint(b.parallel_backend_in_use())\n"
    out = run_python(["-c", code], cwd=tmp_path, env={cpu_backend.PARALLEL_ENV: "threadpool"})
    assert out.stdout.strip() == "threadpool", out


def test_same_result_on_either_backend():
    """Each tile is computed the same way whichever thread takes it: bit-identical logits."""
    if not host_openmp_loaded():
        pytest.skip("no OpenMP runtime is loaded in this process")
    torch.manual_seed(0)
    model = LightweightNet(width_mult=0.5).eval()
    x = torch.randn(1, 3, 64, 64)
    logits = {}
    try:
        with torch_threads(2), torch.inference_mode():
            for name in ("openmp", "threadpool"):
                cpu_backend.set_parallel_backend(name)
                logits[name] = model(x)
    finally:
        cpu_backend.set_parallel_backend("auto")
    assert torch.equal(logits["openmp"], logits["threadpool"])


def _child_computes(args, expected, rtol, atol, queue):
    # Only our op runs here: PyTorch's own threaded ops are not safe after fork either.
    try:
        y = call_op(args).double().numpy()
        queue.put(bool(np.allclose(y, expected, rtol=rtol, atol=atol)))
    except BaseException as e:  # reported by the parent
        queue.put(repr(e))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_computes(parallel_backend):
    """After the parent ran the kernels on 2 threads, a forked child still gets a correct result
    (libgomp's team does not survive fork: using it there would hang)."""
    case = Case(n=2, c_in=32, c_out=48, h=15, w=17, stride=1, dilation=2, mid_act="relu", out_act="relu")
    args = make_args(case)
    expected = reference64(args).numpy()
    rtol, atol = tolerance(torch.float32, case.accumulation_length)
    ctx = multiprocessing.get_context("fork")
    with torch_threads(2):
        call_op(args)  # the parent's team or pool now exists
        queue = ctx.Queue()
        child = ctx.Process(target=_child_computes, args=(args, expected, rtol, atol, queue))
        child.start()
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
            child.join()
            pytest.fail("the forked child hung")
    assert child.exitcode == 0
    assert queue.get(timeout=10) is True
