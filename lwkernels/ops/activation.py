"""The activations the fused op knows, by name, and their nn.Module / functional forms."""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

#: Names accepted wherever lwkernels takes an activation.
ACTIVATIONS = ("none", "relu", "relu6")

ActivationSpec = Union[str, None, nn.Module]


def activation_name(spec: ActivationSpec) -> str:
    """Normalise None / a name / an nn.ReLU, nn.ReLU6 or nn.Identity module to a name in ACTIVATIONS."""
    if spec is None:
        return "none"
    if isinstance(spec, str):
        name = spec.lower()
        if name not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {spec!r}")
        return name
    if isinstance(spec, nn.ReLU6):  # checked before ReLU: ReLU6 is a Hardtanh, not a ReLU, but be explicit
        return "relu6"
    if isinstance(spec, nn.ReLU):
        return "relu"
    if isinstance(spec, nn.Identity):
        return "none"
    raise ValueError(f"unsupported activation module {type(spec).__name__}; expected ReLU, ReLU6 or Identity")


def activation_module(name: str) -> nn.Module:
    """A fresh nn.Module computing the named activation."""
    return {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6}[activation_name(name)]()


def apply_activation(t: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return torch.relu(t)
    if name == "relu6":
        return torch.clamp(t, 0.0, 6.0)
    if name == "none":
        return t
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_backward(grad: torch.Tensor, activated: torch.Tensor, name: str) -> torch.Tensor:
    """The gradient through the named activation, read off its output, with PyTorch's rules at the
    kinks and at NaN (the same rules as the C++ kernels, csrc/activation.h). Where the activation is
    flat the result is 0 even if grad is NaN or Inf: PyTorch selects, it does not multiply.

    - relu: 0 where the output is <= 0, else grad; a NaN output passes grad (threshold_backward).
    - relu6: grad where 0 < output < 6, else 0; a NaN output gets 0, as PyTorch's vectorised CPU
      hardtanh_backward computes it (its scalar tail and its CUDA kernel pass grad there instead).
    """
    if name == "none":
        return grad
    if name == "relu":
        flat = activated <= 0
    elif name == "relu6":
        flat = ~((activated > 0) & (activated < 6))
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return torch.where(flat, torch.zeros((), dtype=grad.dtype, device=grad.device), grad)
