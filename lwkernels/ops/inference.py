"""The fused joint-block op, registered with torch.library as ``torch.ops.lwkernels.joint_block``.

    t = mid_act(dw_scale * depthwise_conv(x; stride, padding, dilation) + dw_shift)
    y = out_act(pw_scale * pointwise_conv(t) + pw_shift + residual)

BatchNorm in inference and conv biases enter as per-channel scale/shift vectors (see nn/folding.py),
so the pointwise weight stays the raw parameter and its packed form can be cached across calls.

Kernels: CPU -> C++ (cpu/backend.py). Any other device runs the reference composition until a
fused kernel is registered for it (the Triton CUDA kernel registers itself with
``joint_block.register_kernel("cuda")``). The fake implementation lets torch.compile and
torch.export trace through the op.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .args import JointArgs
from .contract import check_joint_args, empty_output, output_memory_format
from ..cpu.backend import joint_block_cpu
from .reference import joint_block_reference


@torch.library.custom_op("lwkernels::joint_block", mutates_args=())
def joint_block(
    x: Tensor,
    dw_weight: Tensor,
    dw_scale: Optional[Tensor],
    dw_shift: Optional[Tensor],
    mid_act: str,
    pw_weight: Tensor,
    pw_scale: Optional[Tensor],
    pw_shift: Optional[Tensor],
    residual: Optional[Tensor],
    out_act: str,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> Tensor:
    """Fused dilated depthwise conv -> pointwise conv -> per-channel affine -> activation (+ residual).

    Devices without a fused kernel get the reference composition (correct, not fused)."""
    args = JointArgs(x, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, pw_scale, pw_shift, residual, out_act,
                     stride, padding, dilation)
    check_joint_args(*args)
    return joint_block_reference(*args).contiguous(memory_format=output_memory_format(x))


# The kernels below take exactly joint_block's arguments, in its order (args.JointArgs).
@joint_block.register_kernel("cpu")
def _joint_block_cpu(*inputs):
    return joint_block_cpu(JointArgs(*inputs), check_joint_args(*inputs))


@joint_block.register_fake
def _joint_block_fake(*inputs):
    return empty_output(inputs[0], check_joint_args(*inputs))


#: torch.jit.is_tracing() without its Python frame: it returns this unless TorchScript is scripting,
#: which never runs lwkernels' eager paths. The fast paths ask on every call, after the kernels have
#: evicted the interpreter's objects from the caches: ~8 us there through torch.jit, ~4 us direct.
is_tracing = getattr(torch._C, "_is_tracing", None) or torch.jit.is_tracing


def dispatcher_needed() -> bool:
    """True while something must see every op go through the dispatcher: a compiler, a tracer, a
    torch function/dispatch mode, or a torch.func transform (vmap, grad, ...: its wrapped tensors
    have no storage of their own)."""
    if torch.compiler.is_compiling() or is_tracing() or torch.jit.is_scripting():
        return True
    return modes_active()


def modes_active() -> bool:
    """The part of dispatcher_needed() beyond compiling and tracing (for callers that have just
    checked those): a torch function/dispatch mode or a torch.func transform is active."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return bool(torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack())


def direct_call_allowed(args) -> bool:
    """True when calling the CPU kernel directly is indistinguishable from calling the op: eager
    CPU inference on plain tensors, with nothing (autograd, a compiler, a tracer, a torch
    function/dispatch mode) that needs to see the op go through the dispatcher."""
    x = args[0]
    if type(x) is not torch.Tensor or x.device.type != "cpu" or dispatcher_needed():
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def call_joint_block(*args) -> Tensor:
    """``joint_block(*args)``, entering the op's CPU kernel directly where nothing needs the
    dispatcher (see direct_call_allowed): the same code and result without ~45 us of Python
    dispatch per call, which is 5-10% of a small block. Everything else goes through the op."""
    if direct_call_allowed(args):
        return _joint_block_cpu(*args)
    return joint_block(*args)
