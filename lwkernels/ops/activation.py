"""The activations the fused op knows, by name, their nn.Module / functional forms and their
gradients. The C++ kernels implement the same functions in csrc/activation.h."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

#: Names accepted wherever lwkernels takes an activation.
ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "silu")

#: Activations whose gradient needs their input (it cannot be read off their output).
NEEDS_INPUT_FOR_GRAD = ("hardswish", "silu")

_MODULES = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}

ActivationSpec = Union[str, None, nn.Module]


def activation_name(spec: ActivationSpec) -> str:
    """Normalise None / a name / an activation module (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU,
    nn.Identity) to a name in ACTIVATIONS."""
    if spec is None:
        return "none"
    if isinstance(spec, str):
        name = spec.lower()
        if name not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {spec!r}")
        return name
    for name, cls in _MODULES.items():  # exact types: a subclass may compute something else
        if type(spec) is cls:
            return name
    raise ValueError(f"unsupported activation module {type(spec).__name__}; expected one of "
                     f"{', '.join(cls.__name__ for cls in _MODULES.values())}")


def activation_module(name: str) -> nn.Module:
    """A fresh nn.Module computing the named activation."""
    return _MODULES[activation_name(name)]()


def apply_activation(t: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return torch.relu(t)
    if name == "relu6":
        return torch.clamp(t, 0.0, 6.0)
    if name == "hardswish":
        return F.hardswish(t)
    if name == "silu":
        return F.silu(t)
    if name == "none":
        return t
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_backward(grad: torch.Tensor, activated: torch.Tensor, name: str,
                        pre: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient through the named activation, with PyTorch's rules at the kinks and at NaN (the
    same rules as the C++ kernels, csrc/activation.h). relu and relu6 read it off their output
    `activated`; hardswish and silu need their input `pre` (NEEDS_INPUT_FOR_GRAD) and use PyTorch's
    own backward functions. Where relu/relu6 are flat the result is 0 even if grad is NaN or Inf:
    PyTorch selects, it does not multiply.

    - relu: 0 where the output is <= 0, else grad; a NaN output passes grad (threshold_backward).
    - relu6: grad where 0 < output < 6, else 0; a NaN output gets 0, as PyTorch's vectorised CPU
      hardtanh_backward computes it (its scalar tail and its CUDA kernel pass grad there instead).
    """
    if name == "none":
        return grad
    if name in NEEDS_INPUT_FOR_GRAD:
        if pre is None:
            raise ValueError(f"the {name} gradient needs the activation's input")
        # `pre` may be wider than grad (fp32 beside fp16 grads): computed in pre's dtype, returned in grad's.
        wide = grad.to(pre.dtype)
        if name == "silu":
            return torch.ops.aten.silu_backward(wide, pre).to(grad.dtype)
        # PyTorch's vectorised CPU kernel gives NaN at a NaN input, its scalar tail passes grad:
        # the vectorised rule everywhere, as the C++ kernels.
        g = torch.ops.aten.hardswish_backward(wide, pre)
        return torch.where(torch.isnan(pre), pre, g).to(grad.dtype)
    if name == "relu":
        flat = activated <= 0
    elif name == "relu6":
        flat = ~((activated > 0) & (activated < 6))
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return torch.where(flat, torch.zeros((), dtype=grad.dtype, device=grad.device), grad)
