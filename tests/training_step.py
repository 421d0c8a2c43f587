"""One JointBlock training step three ways, for the low-precision training tests: the block under
test, PyTorch's own nn modules in the same dtype and device, and float64 on the CPU. The block's
error against float64 may be at most twice PyTorch's own plus a small atol (docs/testing.md,
Tolerances), for y, every gradient and every running statistic."""
from __future__ import annotations

import copy
from typing import Dict, NamedTuple, Optional

import torch

from helpers import randomize_
from lwkernels import JointBlock
from lwkernels.ops.reference import JointBlockReference

#: (c_in, c_out, stride, dilation, mid_norm, act, residual)
CASES = [
    (17, 17, 1, 2, True, "relu", True),
    (3, 17, 2, 3, True, "relu6", False),
    (1, 3, 2, 2, False, "relu", False),
    (17, 3, 1, 3, False, "none", False),
    (32, 64, 2, 2, True, "relu", False),
    (96, 96, 1, 3, False, "relu", True),
]

#: The absolute part of the allowance, relative to 1 + the largest reference value.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def training_pair(c_in, c_out, stride, dilation, mid_norm, act, seed=0) -> JointBlock:
    """A float64 JointBlock in training mode with random parameters and statistics."""
    block = JointBlock(c_in, c_out, stride=stride, dilation=dilation, activation=None if act == "none" else act,
                       mid_norm=mid_norm, dtype=torch.float64)
    randomize_(block, seed)
    return block.train()


def reference_of(block: JointBlock) -> JointBlockReference:
    """The same block as PyTorch's nn modules (copies), in training mode."""
    return JointBlockReference(*(copy.deepcopy(m) for m in (block.depthwise, block.pointwise, block.bn, block.act,
                                                             block.mid_bn, block.mid_act))).train()


class Step(NamedTuple):
    y: torch.Tensor
    grads: Dict[str, torch.Tensor]
    buffers: Dict[str, torch.Tensor]


def run_step(model, x: torch.Tensor, r: Optional[torch.Tensor], g: torch.Tensor) -> Step:
    """Forward, backward of sum(y * g); returns y, the gradients of x and every parameter, the buffers."""
    x = x.clone().requires_grad_()
    y = model(x, r)
    (y.float() * g).sum().backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return Step(y, grads, dict(model.named_buffers()))


def step_inputs(case, layout: str, n: int = 3, h: int = 13, w: int = 11):
    """(x, residual or None, output gradient) for a case: float64 x and residual in the layout
    ("nchw" or "cl"), a float32 gradient."""
    c_in, c_out, stride, _, _, _, residual = case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64)
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    r = torch.randn(n, c_out, oh, ow, generator=gen, dtype=torch.float64) if residual else None
    g = torch.randn(n, c_out, oh, ow, generator=gen)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    return x.contiguous(memory_format=fmt), None if r is None else r.contiguous(memory_format=fmt), g


def _check(name, got, lowp, ref, atol):
    got, lowp = got.detach().double().cpu(), lowp.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref).abs().max().item()
    torch_err = (lowp - ref).abs().max().item()
    assert err <= 2 * torch_err + atol * (1 + ref.abs().max().item()), \
        f"{name}: error {err:.3e}, PyTorch's own {torch_err:.3e}"


def assert_step_matches(got: Step, torch_lowp: Step, ref: Step, dtype: torch.dtype) -> None:
    """got's y, gradients and running statistics against float64, within twice PyTorch's own error."""
    atol = ATOL[dtype]
    _check("y", got.y, torch_lowp.y, ref.y, atol)
    for name in ref.grads:
        _check(f"grad {name}", got.grads[name], torch_lowp.grads[name], ref.grads[name], atol)
    for name in ref.buffers:
        if name.endswith("num_batches_tracked"):
            assert int(got.buffers[name]) == int(ref.buffers[name])
            continue
        _check(name, got.buffers[name], torch_lowp.buffers[name], ref.buffers[name], atol)
