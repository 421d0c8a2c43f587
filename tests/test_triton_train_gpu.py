"""The training op's Triton kernels (fused depthwise -> pointwise with the statistics epilogue, the
depthwise statistics pass for mid BatchNorm, the depthwise backward) on a CUDA device: a full
JointBlock training step (forward, backward, running statistics) against the float64 nn-module
composition, in fp32, fp16 and bf16, NCHW and channels_last, with and without mid BatchNorm.

Low precision follows docs/testing.md, Tolerances: the fused step's error against float64 may be
at most twice PyTorch's own error running the same nn modules in that dtype on the GPU, plus a
small atol.
The offline-compilation test runs anywhere Triton is installed; the rest are skipped without CUDA.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from helpers import expected_memory_format
from training_step import CASES, assert_step_matches, reference_of, run_step, step_inputs, training_pair
from triton_helpers import aot_signature
from lwkernels.ops import training
from lwkernels.triton import training as triton_training

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
HAS_BF16 = HAS_CUDA and torch.cuda.get_device_capability()[0] >= 8
cuda_only = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and Triton")


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_stats_kernel_compiles_without_a_gpu(channels_last):
    """The depthwise statistics kernel lowers and assembles for sm_90 (the fused kernel's statistics
    epilogue is compiled by test_triton_gpu.py's offline test)."""
    from lwkernels.triton import joint_block as triton_kernel

    if triton_kernel.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernel is an interpreted function")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ASTSource/GPUTarget ahead-of-time API")
    fn = triton_kernel._depthwise_stats_kernel
    c, hw, n = 32, 56, 8
    values = dict(M=n * hw * hw, OHW=hw * hw, C_IN=c, H=hw, W=hw, OW=hw, sdc=9, sdh=3, sdw=1, STRIDE_H=2,
                  STRIDE_W=2, PAD_H=3, PAD_W=3, DIL_H=3, DIL_W=3)
    if channels_last:
        values.update(sxn=hw * hw * c, sxc=1, sxh=hw * c, sxw=c)
    else:
        values.update(sxn=hw * hw * c, sxc=hw * hw, sxh=hw, sxw=1)
    constexprs = dict(KH=3, KW=3, BLOCK_P=64, BLOCK_CI=32, CHANNELS_LAST=channels_last, INDEX_64=False)
    signature, constexprs, _ = aot_signature(
        fn, values, constexprs, lambda name: "*bf16" if name in ("x_ptr", "dw_w_ptr") else "*fp32")
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4, "num_stages": 1})
    assert "st.global" in kernel.asm["ptx"]


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("kernel", ["grad_input", "grad_weight"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_backward_kernels_compile_without_a_gpu(kernel, channels_last):
    """The depthwise backward kernels (triton_dw_backward) lower and assemble for sm_90 in bf16."""
    from lwkernels.triton import dw_backward as triton_dw_backward

    if triton_dw_backward.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernels are interpreted functions")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ASTSource/GPUTarget ahead-of-time API")
    c, hw, n, ohw = 32, 56, 8, 28

    def strides(prefix, h):
        if channels_last:
            return {f"{prefix}n": h * h * c, f"{prefix}c": 1, f"{prefix}h": h * c, f"{prefix}w": c}
        return {f"{prefix}n": h * h * c, f"{prefix}c": h * h, f"{prefix}h": h, f"{prefix}w": 1}

    values = dict(C=c, W=hw, OW=ohw, STRIDE_H=2, STRIDE_W=2, PAD_H=3, PAD_W=3, DIL_H=3, DIL_W=3,
                  **strides("sg", ohw), **strides("sx", hw))
    if kernel == "grad_input":
        fn = triton_dw_backward._dw_grad_input_kernel
        values.update(M=n * hw * hw, HW=hw * hw, OH=ohw, swc=9, swh=3, sww=1)
        pointer = lambda name: "*bf16"  # noqa: E731
    else:
        fn = triton_dw_backward._dw_grad_weight_kernel
        values.update(M=n * ohw * ohw, OHW=ohw * ohw, H=hw)
        pointer = lambda name: "*fp32" if name == "part_ptr" else "*bf16"  # noqa: E731
    constexprs = dict(KH=3, KW=3, BLOCK_P=64, BLOCK_C=32)
    signature, constexprs, _ = aot_signature(fn, values, constexprs, pointer)
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 1})
    assert "st.global" in compiled.asm["ptx"]


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_training_step_matches_reference(case, dtype, layout, request):
    if dtype == torch.bfloat16 and not HAS_BF16:
        pytest.skip("bf16 tensor-core dots need sm_80 or newer")
    if dtype == torch.float32:
        # Full fp32 on both sides: cuDNN takes TF32 for some of these shapes and not for others, so
        # PyTorch's own fp32 error is no yardstick for a TF32 kernel (test_triton_gpu.py covers TF32).
        request.getfixturevalue("tf32_off")
    c_in, c_out, stride, dilation, mid_norm, act, residual = case
    block64 = training_pair(c_in, c_out, stride, dilation, mid_norm, act)
    x, r, g = step_inputs(case, layout)
    # The fused block on CUDA in `dtype`, PyTorch's nn modules on CUDA in `dtype`, and float64 on the CPU.
    block = copy.deepcopy(block64).to("cuda", dtype)
    lowp = reference_of(block64).to("cuda", dtype)
    xd, rd, gd = x.to("cuda", dtype), None if r is None else r.to("cuda", dtype), g.cuda()
    assert triton_training.uses_triton_forward(xd, tuple(g.shape)), \
        "the CUDA training forward did not take the Triton path"
    got = run_step(block, xd, rd, gd)
    assert got.y.dtype == dtype and got.y.is_contiguous(memory_format=expected_memory_format(x))
    assert_step_matches(got, run_step(lowp, xd, rd, gd), run_step(reference_of(block64), x, r, g.double()), dtype)


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_statistics_are_deterministic(dtype):
    """No atomics: two runs of the training forward give bit-identical z and statistics."""
    block = training_pair(64, 96, 1, 3, True, "relu").to("cuda", dtype)
    x = torch.randn(4, 64, 29, 31, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    outs = [training.joint_block_train(
        x, block.depthwise.weight, block.depthwise.bias, block.mid_bn.weight, block.mid_bn.bias, True, 1e-5, "relu",
        block.pointwise.weight, block.pointwise.bias, block.bn.weight, block.bn.bias, 1e-5, None, "relu",
        [1, 1], [3, 3], [3, 3]) for _ in range(2)]
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@cuda_only
@pytest.mark.cuda
def test_compiled_training_step_uses_the_kernels():
    """torch.compile(fullgraph=True) traces the training op on CUDA; the step matches eager."""
    block = training_pair(17, 17, 1, 2, True, "relu").to("cuda", torch.float32)
    ref = copy.deepcopy(block)
    x = torch.randn(2, 17, 11, 9, device="cuda")
    compiled = torch.compile(block, fullgraph=True)
    y = compiled(x)
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
