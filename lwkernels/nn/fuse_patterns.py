"""What fuse() recognises: the modules and functional calls a depthwise-separable chain is made of.

Every test here is exact (class identity or a stock ``forward``): a subclass that computes
something else must never be taken for the module it derives from.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import activation as _activation


def supported_activations() -> Tuple[str, ...]:
    """The activations the op implements, read at call time (the tuple grows as the op learns more)."""
    return tuple(_activation.ACTIVATIONS)


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None)
                or getattr(m, "_backward_pre_hooks", None))


def stock(m: nn.Module, cls: type) -> bool:
    """An instance of `cls` whose forward is cls's own (a subclass overriding forward computes
    something else and must not be fused)."""
    return isinstance(m, cls) and type(m).forward is cls.forward


# -- activations ---------------------------------------------------------------------------------

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu",
                       nn.Identity: "none"}

# Functions whose only tensor argument is the activated value (plus an optional `inplace` flag).
_ACTIVATION_FUNCTIONS = {torch.relu: "relu", torch.relu_: "relu", F.relu: "relu", F.relu_: "relu",
                         F.relu6: "relu6", F.hardswish: "hardswish", F.silu: "silu"}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}


def module_activation(m: nn.Module) -> Optional[str]:
    """The activation a stock activation module computes ("relu", ..., "none"), else None."""
    name = _ACTIVATION_MODULES.get(type(m))
    return name if name is not None and not has_hooks(m) else None


def function_activation(target, args, kwargs) -> Optional[str]:
    """The activation of a functional call ``target(*args, **kwargs)`` applied to args[0], else None."""
    name = _ACTIVATION_FUNCTIONS.get(target)
    if name is None:
        return None
    extra_args = args[1:]
    if set(kwargs) - {"inplace"} or len(extra_args) > 1 or (extra_args and not isinstance(extra_args[0], bool)):
        return None
    if extra_args and target in (torch.relu, torch.relu_):
        return None
    return name


def method_activation(method: str, args, kwargs) -> Optional[str]:
    """The activation of ``tensor.method()``, else None."""
    if kwargs or len(args) != 1:
        return None
    return _ACTIVATION_METHODS.get(method)


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


# -- identities between the chain's modules --------------------------------------------------------

def is_identity_module(m: nn.Module) -> bool:
    """A module that returns its input unchanged in every mode: nn.Identity, dropout with p == 0,
    drop-path / stochastic depth with probability 0 (timm's DropPath, torchvision's StochasticDepth)."""
    if has_hooks(m):
        return False
    if type(m) is nn.Identity:
        return True
    if type(m) in _DROPOUTS:
        return m.p == 0
    name = type(m).__name__
    if name == "DropPath":
        return getattr(m, "drop_prob", None) == 0
    if name == "StochasticDepth":
        return getattr(m, "p", None) == 0
    return False


# -- norms -------------------------------------------------------------------------------------------

def is_norm_module(m: nn.Module) -> bool:
    """BatchNorm2d or any subclass (recognised or not: an unknown one is reported, not fused)."""
    return isinstance(m, nn.BatchNorm2d)


def norm_activation(m: nn.BatchNorm2d) -> Tuple[Optional[nn.Module], Optional[str]]:
    """(the activation module the norm applies itself, None) for a recognised norm; (None, reason)
    for an unknown BatchNorm2d subclass. A stock BatchNorm2d carries nn.Identity-like nothing: (None, None).

    timm's BatchNormAct2d is ``batch_norm -> drop -> act``; its drop part must be an identity."""
    if stock(m, nn.BatchNorm2d):
        return None, None
    if type(m).__name__ == "BatchNormAct2d" and isinstance(getattr(m, "act", None), nn.Module) \
            and isinstance(getattr(m, "drop", None), nn.Module):
        if not is_identity_module(m.drop):
            return None, f"{type(m).__name__} applies {type(m.drop).__name__} (not an identity) after the norm"
        return m.act, None
    return None, f"unknown norm subclass {type(m).__name__} (its forward may compute more than BatchNorm2d)"


def plain_batchnorm_sharing(m: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A stock nn.BatchNorm2d that shares `m`'s parameters and buffers (the same tensors, so training
    either trains both), for a BatchNorm2d subclass whose activation the JointBlock applies itself."""
    bn = nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                        track_running_stats=m.track_running_stats, device="meta")
    for name in ("weight", "bias"):
        setattr(bn, name, getattr(m, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        bn._buffers[name] = m._buffers.get(name)
    bn.training = m.training
    return bn


# -- convolutions --------------------------------------------------------------------------------------

def is_mixed_depthwise(m: nn.Module) -> bool:
    """timm's MixedConv2d over depthwise kernels: several kernel sizes over channel splits."""
    return type(m).__name__ == "MixedConv2d" and isinstance(m, nn.ModuleDict) and len(m) > 0 and all(
        isinstance(c, nn.Conv2d) and c.groups > 1 and c.groups == c.in_channels for c in m.values())


def depthwise_problem(m: nn.Conv2d) -> Optional[str]:
    """Why the grouped Conv2d `m` cannot start a chain, or None."""
    if m.groups != m.in_channels or m.out_channels != m.in_channels:
        kind = "grouped conv" if m.groups != m.in_channels else "depthwise conv with a channel multiplier"
        return (f"{kind} (in_channels={m.in_channels}, out_channels={m.out_channels}, groups={m.groups}) "
                "is not depthwise: needs groups == in_channels == out_channels")
    if not stock(m, nn.Conv2d):
        return (f"{type(m).__name__} overrides Conv2d.forward (run-time padding such as timm's Conv2dSame "
                "is not supported)")
    if has_hooks(m):
        return "modules with hooks would stop firing: the depthwise conv"
    return dtype_problem(m)


def pointwise_problem(m: nn.Conv2d) -> Optional[str]:
    if m.kernel_size != (1, 1) or m.groups != 1 or m.stride != (1, 1) or m.padding != (0, 0) or m.dilation != (1, 1):
        return (f"kernel {tuple(m.kernel_size)}, stride {tuple(m.stride)}, padding {m.padding}, groups {m.groups}: "
                "is not a 1x1 pointwise conv")
    if not stock(m, nn.Conv2d):
        return f"{type(m).__name__} overrides Conv2d.forward"
    return None


def dtype_problem(m: nn.Module) -> Optional[str]:
    dtypes = {t.dtype for t in m.parameters(recurse=False)}
    bad = [d for d in dtypes if not d.is_floating_point]
    return f"non-float dtype {bad[0]} is not supported" if bad else None


# -- residual additions ------------------------------------------------------------------------------

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


def is_add(op: str, target, args, kwargs) -> bool:
    """``a + b`` / ``a += b`` / ``torch.add(a, b)`` / ``a.add(b)`` without alpha or out."""
    if len(args) != 2 or kwargs:
        return False
    if op == "call_function":
        return target in _ADD_FUNCTIONS
    return op == "call_method" and target in _ADD_METHODS
