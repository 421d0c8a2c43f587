"""Shared fixtures of the test suite (no autouse fixtures: every test opts in by name)."""
from __future__ import annotations

import math

import pytest
import torch

import lwkernels.cpu.backend as cpu_backend
from helpers import cpu_paths_here, host_openmp_loaded, torch_threads
from lwkernels.ops.contract import empty_output


@pytest.fixture(params=cpu_paths_here())
def cpu_isa(request, monkeypatch):
    """Runs the test once per CPU path available here, forced through LWKERNELS_CPU_ISA."""
    monkeypatch.setenv(cpu_backend.ISA_ENV, request.param)
    return request.param


@pytest.fixture(params=["openmp", "threadpool"])
def parallel_backend(request):
    """Runs the test on each way the CPU kernels can run their threads (PyTorch's OpenMP team, when
    its runtime is loaded here, and lwkernels' own pool); restores the automatic choice."""
    if request.param == "openmp" and not host_openmp_loaded():
        pytest.skip("no OpenMP runtime is loaded in this process (PyTorch built without OpenMP)")
    cpu_backend.set_parallel_backend(request.param)
    try:
        yield request.param
    finally:
        cpu_backend.set_parallel_backend("auto")


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def num_threads(request):
    """Runs the test with torch.set_num_threads(1) and (2); restores the previous setting."""
    with torch_threads(request.param):
        yield request.param


@pytest.fixture
def single_thread():
    """torch.set_num_threads(1) for one test (restored afterwards): PyTorch's own small convs, used
    as references, slow down by orders of magnitude when OpenMP threads compete for shared cores."""
    with torch_threads(1):
        yield


@pytest.fixture
def nan_outputs(monkeypatch):
    """Outputs the CPU backend allocates come pre-filled with NaN, so a kernel that skips a tile
    (or accumulates into its output instead of writing it) fails loudly (docs/testing.md,
    NaN-poisoned outputs)."""

    def poisoned(x, shape):
        y = empty_output(x, shape)
        if y.dtype.is_floating_point:
            y.fill_(math.nan)
        return y

    monkeypatch.setattr(cpu_backend, "empty_output", poisoned)  # raises if the backend renamed it
    return poisoned


@pytest.fixture
def cudnn_tf32():
    """Restores PyTorch's TF32 settings for convolutions after the test changes them."""
    legacy = torch.backends.cudnn.allow_tf32
    conv = getattr(torch.backends.cudnn, "conv", None)
    fine = conv.fp32_precision if conv is not None else None
    yield
    torch.backends.cudnn.allow_tf32 = legacy
    if conv is not None:
        conv.fp32_precision = fine


@pytest.fixture
def tf32_off(cudnn_tf32):
    """PyTorch's convolutions, and so the Triton kernels' fp32 dots, in full fp32 for one test."""
    torch.backends.cudnn.allow_tf32 = False
