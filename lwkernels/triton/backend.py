"""The op's CUDA implementation: the Triton kernel in joint_block.py behind the torch op.

`register_cuda_kernel()` registers it as ``torch.ops.lwkernels.joint_block``'s CUDA kernel; it is a
no-op returning False where Triton cannot be imported (CUDA tensors then keep the op's default,
the reference composition). Triton itself is imported only when this registration runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.contract import check_joint_args, output_memory_format
from ..ops.reference import joint_block_reference

_registered = False
_triton_ok: Optional[bool] = None


def cudnn_conv_uses_tf32() -> bool:
    """Whether PyTorch lets cuDNN convolutions use TF32 for fp32 (the kernel then does the same).

    This is `torch.backends.cudnn.allow_tf32`. PyTorch >= 2.9 also has the finer
    `torch.backends.cudnn.conv.fp32_precision`; reading the legacy flag raises when the two APIs were
    mixed, so where the finer setting exists we read the one that governs convolutions."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is not None:
        try:
            return getter("cuda", "conv") == "tf32"
        except RuntimeError:  # pragma: no cover - older/newer naming; fall back to the legacy flag
            pass
    return bool(torch.backends.cudnn.allow_tf32)


def _has_tf32(device: torch.device) -> bool:
    """TF32 tensor cores exist from Ampere (sm_80) on; before that the dot is plain fp32."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 8


def joint_block_cuda(
    x, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, pw_scale, pw_shift, residual, out_act,
    stride, padding, dilation, *, allow_tf32: Optional[bool] = None,
) -> torch.Tensor:
    """The op on CUDA tensors: fp16/bf16/fp32 in the fused Triton kernel; other dtypes (fp64) in the
    reference composition, so gradcheck-style fp64 checks still work on a GPU."""
    args = (x, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, pw_scale, pw_shift, residual, out_act,
            stride, padding, dilation)
    check_joint_args(*args)
    from .joint_block import KERNEL_DTYPES, joint_block_triton

    if x.dtype not in KERNEL_DTYPES:
        return joint_block_reference(*args).contiguous(memory_format=output_memory_format(x))
    if allow_tf32 is None:
        allow_tf32 = uses_tf32(x)
    return joint_block_triton(*args, allow_tf32=allow_tf32)


def uses_tf32(x: torch.Tensor) -> bool:
    """Whether the Triton kernels use TF32 for x: fp32 on a TF32-capable device, when PyTorch would
    for a convolution."""
    return x.dtype == torch.float32 and cudnn_conv_uses_tf32() and _has_tf32(x.device)


def triton_available() -> bool:
    """Whether Triton imports here (the training op's CUDA path then uses the Triton kernels)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _triton_ok = True
        except Exception:  # ImportError, or a Triton that fails to initialise on this platform
            _triton_ok = False
    return _triton_ok


def register_cuda_kernel() -> bool:
    """Make the Triton kernel the CUDA implementation of torch.ops.lwkernels.joint_block.

    Returns True once registered (repeat calls are no-ops), False where Triton is not importable."""
    global _registered
    if _registered:
        return True
    if not triton_available():
        return False
    from ..ops.inference import joint_block

    @joint_block.register_kernel("cuda")
    def _joint_block_cuda(*args):
        return joint_block_cuda(*args)

    _registered = True
    return True
