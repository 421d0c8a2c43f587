"""What the fused op accepts and what it returns: argument checks, output shape, memory format.

Shared by every implementation of the op (CPU, CUDA, fake/meta) so that they raise the same clear
errors and agree on the output's shape and strides.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .activation import ACTIVATIONS


def _pair(name: str, value: Sequence[int]) -> Tuple[int, int]:
    values = tuple(value)
    if len(values) != 2 or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be two ints (h, w), got {value!r}")
    return values  # type: ignore[return-value]


def _check_vector(name: str, v: Optional[torch.Tensor], channels: int, x: torch.Tensor) -> None:
    if v is None:
        return
    if v.dim() != 1 or v.shape[0] != channels:
        raise ValueError(f"{name} must have shape [{channels}], got {list(v.shape)}")
    _check_like(name, v, x)


def _check_like(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; all operands must share one dtype "
                        f"(convert x with x.to({t.dtype}) or the module with .to({x.dtype}))")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all operands must be on one device "
                         f"(move x with x.to('{t.device}') or the module with .to('{x.device}'))")


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 4:
        hint = " (one image needs a batch dimension: x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got {x.dim()}-D shape {list(x.shape)}{hint}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must have a floating-point dtype, got {x.dtype} (convert it with x.float())")


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_joint_args(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_scale: Optional[torch.Tensor],
    dw_shift: Optional[torch.Tensor],
    mid_act: str,
    pw_weight: torch.Tensor,
    pw_scale: Optional[torch.Tensor],
    pw_shift: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    out_act: str,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tuple[int, int, int, int]:
    """Raise a clear exception for anything the op cannot compute; return the output shape."""
    _check_input(x)
    n, c_in, h, w = x.shape
    if dw_weight.dim() == 4 and dw_weight.shape[1] == 1 and dw_weight.shape[0] != c_in:
        raise ValueError(
            f"x has {c_in} channels (shape {list(x.shape)}) but the block expects {dw_weight.shape[0]}: "
            f"dw_weight must have shape [C_in={c_in}, 1, kh, kw] to match x, got {list(dw_weight.shape)}"
        )
    if dw_weight.dim() != 4 or dw_weight.shape[1] != 1:
        raise ValueError(
            f"dw_weight must have shape [C_in={c_in}, 1, kh, kw] (a depthwise nn.Conv2d weight), "
            f"got {list(dw_weight.shape)}"
        )
    _check_like("dw_weight", dw_weight, x)
    if pw_weight.dim() == 4 and pw_weight.shape[1] != c_in and tuple(pw_weight.shape[2:]) == (1, 1):
        raise ValueError(
            f"the pointwise conv takes {pw_weight.shape[1]} channels but the depthwise conv gives {c_in}: "
            f"pw_weight must have shape [C_out, C_in={c_in}, 1, 1], got {list(pw_weight.shape)}"
        )
    if pw_weight.dim() != 4 or tuple(pw_weight.shape[2:]) != (1, 1):
        raise ValueError(
            f"pw_weight must have shape [C_out, C_in={c_in}, 1, 1] (a 1x1 nn.Conv2d weight), "
            f"got {list(pw_weight.shape)}"
        )
    _check_like("pw_weight", pw_weight, x)
    c_out = pw_weight.shape[0]
    if c_out < 1:
        raise ValueError("pw_weight must have at least one output channel")
    _check_vector("dw_scale", dw_scale, c_in, x)
    _check_vector("dw_shift", dw_shift, c_in, x)
    _check_vector("pw_scale", pw_scale, c_out, x)
    _check_vector("pw_shift", pw_shift, c_out, x)
    for name, act in (("mid_act", mid_act), ("out_act", out_act)):
        if act not in ACTIVATIONS:
            raise ValueError(f"{name} must be one of {ACTIVATIONS}, got {act!r}")

    stride = _pair("stride", stride)
    padding = _pair("padding", padding)
    dilation = _pair("dilation", dilation)
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be positive, got {dilation}")
    if min(padding) < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")

    kh, kw = dw_weight.shape[2], dw_weight.shape[3]
    out_h = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"the dilated kernel ({dilation[0] * (kh - 1) + 1}x{dilation[1] * (kw - 1) + 1}) is larger than the "
            f"padded input ({h + 2 * padding[0]}x{w + 2 * padding[1]}): x of shape {list(x.shape)} is too small for "
            f"a {kh}x{kw} kernel with dilation {tuple(dilation)} and padding {tuple(padding)}"
        )
    out_shape = (n, c_out, out_h, out_w)
    if residual is not None:
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"residual must have the output's shape {list(out_shape)}, got {list(residual.shape)}")
        _check_like("residual", residual, x)
    return out_shape


def check_inverted_residual_args(x: torch.Tensor, expand_weight: torch.Tensor, expand_scale: Optional[torch.Tensor],
                                 expand_shift: Optional[torch.Tensor], expand_act: str, *joint_rest
                                 ) -> Tuple[int, int, int, int]:
    """check_joint_args for the depthwise -> project part over the expanded tensor, after the expand
    step's own checks (x, its 1x1 weight [C_exp, C_in, 1, 1], [C_exp] scale/shift, activation);
    returns the output shape."""
    _check_input(x)
    n, c_in, h, w = x.shape
    if expand_weight.dim() != 4 or tuple(expand_weight.shape[1:]) != (c_in, 1, 1) or expand_weight.shape[0] < 1:
        raise ValueError(f"expand_weight must have shape [C_exp, C_in={c_in}, 1, 1] (a 1x1 nn.Conv2d weight over "
                         f"x's {c_in} channels), got {list(expand_weight.shape)}")
    _check_like("expand_weight", expand_weight, x)
    c_exp = expand_weight.shape[0]
    _check_vector("expand_scale", expand_scale, c_exp, x)
    _check_vector("expand_shift", expand_shift, c_exp, x)
    if expand_act not in ACTIVATIONS:
        raise ValueError(f"expand_act must be one of {ACTIVATIONS}, got {expand_act!r}")
    # The expanded tensor's stand-in: its shape, x's dtype and device, one element of storage.
    expanded = torch.empty_strided((n, c_exp, h, w), (0, 0, 0, 0), dtype=x.dtype, device=x.device)
    try:
        return check_joint_args(expanded, *joint_rest)
    except ValueError as e:
        raise ValueError(f"{e} (the depthwise conv runs over the {c_exp} expanded channels)") from None


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The output follows the input: channels_last in, channels_last out; anything else gives NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_output(x: torch.Tensor, shape: Tuple[int, int, int, int]) -> torch.Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
