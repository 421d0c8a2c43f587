"""The training step in fp16 and bf16 on the CPU, where the training op runs in PyTorch ops
(lwkernels/ops/training_reference.py, whose normalisation and backward the CUDA path also runs
around its Triton kernels): y, every gradient and the running statistics against float64, within
twice PyTorch's own error in that dtype (tests/training_step.py; the GPU twin is
test_triton_train_gpu.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from training_step import CASES, assert_step_matches, reference_of, run_step, step_inputs, training_pair


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_low_precision_training_step(case, dtype, layout):
    block64 = training_pair(*case[:6])
    x, r, g = step_inputs(case, layout)
    xd, rd = x.to(dtype), None if r is None else r.to(dtype)
    got = run_step(copy.deepcopy(block64).to(dtype), xd, rd, g)
    assert got.y.dtype == dtype
    assert_step_matches(got, run_step(reference_of(block64).to(dtype), xd, rd, g),
                        run_step(reference_of(block64), x, r, g.double()), dtype)
