"""What the Triton kernel's tests share (in the interpreter and on a GPU): the case grid, moving
arguments to a device with their exact strides, and the dtype-aware comparison rule of
docs/testing.md, Tolerances.

The rule: the kernel's error against the float64 reference may be at most twice the error of
PyTorch itself computing the block in the same dtype (same device, same TF32 setting), plus an
absolute term equal to the rounding the kernel's own precision contract allows:

    |y - ref| <= 2 * max|torch_lowp - ref| + (u_dot + K * 2^-24) * B + u_out * |ref|   (per element)

where B is the block evaluated on absolute values (|x|, |weights|, |scales|, |shifts|, |residual|, no
activations) -- the sum of the magnitudes of every term, so (u_dot + K * 2^-24) * B bounds the effect
of rounding the dot's operands (u_dot: 2^-11 for fp16 and TF32 per operand, 2^-8 for bf16, 0 for
full fp32) and of K fp32 accumulations -- and u_out * |ref| is the final rounding to the output
dtype. A wrong tap, a dropped channel, a missing epilogue term or a skipped tile is orders of
magnitude above this bound; every element is compared, and NaN/inf anywhere fails.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from helpers import Case, expected_memory_format, make_args, reference64
from lwkernels.ops.reference import joint_block_reference
from lwkernels.triton.offline import aot_signature  # noqa: F401  (the offline-compilation tests use it)

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def dot_operand_roundoff(dtype: torch.dtype, tf32: bool) -> float:
    """Relative error the kernel's tl.dot may add by rounding its operands (fp32 accumulate)."""
    if dtype == torch.float32:
        return 2 * 2.0 ** -11 if tf32 else 0.0  # TF32 rounds both operands to 11 significant bits
    return UNIT_ROUNDOFF[dtype]  # the depthwise result is rounded to fp16/bf16; the weights already are


def to_device(t, device):
    """`t` on `device` with the same sizes and strides (views stay views, channels_last stays)."""
    if not isinstance(t, torch.Tensor):
        return t
    broadcast = [d for d in range(t.dim()) if t.stride(d) == 0 and t.shape[d] > 1]
    if broadcast:  # expanded dims cannot be written: move one slice, expand it again
        base = t
        for d in broadcast:
            base = base.narrow(d, 0, 1)
        return to_device(base, device).expand(t.shape)
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    out.copy_(t)
    return out


def args_to(args: Sequence, device) -> List:
    return [to_device(a, device) for a in args]


def magnitude_bound(args: Sequence) -> torch.Tensor:
    """The block on absolute values, without activations, in float64: the sum of |every term|."""
    a = [x.detach().double().abs() if isinstance(x, torch.Tensor) else x for x in args]
    a[4] = a[9] = "none"
    return joint_block_reference(*a)


@dataclass
class Comparison:
    kernel_error: float
    torch_error: float
    worst_ratio: float  # max over elements of |y - ref| / allowed (<= 1 passes)


def assert_matches_lowp_rule(y: torch.Tensor, args: Sequence, *, tf32: bool = False,
                             torch_lowp: Optional[torch.Tensor] = None,
                             crop: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Comparison:
    """Check y (the kernel's output for `args`) against the float64 reference with the rule above.

    `torch_lowp`: PyTorch's own result in the kernel's dtype (computed here when omitted, on the
    arguments' device, under the current TF32 setting). `crop`: y is only part of the output of
    `args`; crop(full) selects that part from the references (the memory format is then not checked).
    """
    x = args[0]
    if torch_lowp is None:
        torch_lowp = joint_block_reference(*args)
    ref, bound = reference64(args), magnitude_bound(args)
    if crop is not None:
        ref, bound, torch_lowp = crop(ref), crop(bound), crop(torch_lowp)
    assert y.dtype == x.dtype, f"output dtype {y.dtype}, input dtype {x.dtype}"
    assert y.device == x.device, f"output on {y.device}, input on {x.device}"
    assert tuple(y.shape) == tuple(ref.shape), f"output shape {list(y.shape)}, expected {list(ref.shape)}"
    if crop is None:
        fmt = expected_memory_format(x)
        assert y.is_contiguous(memory_format=fmt), \
            f"output strides {y.stride()} not dense in {fmt} (x strides {x.stride()})"
    if y.numel() == 0:
        return Comparison(0.0, 0.0, 0.0)
    assert torch.isfinite(ref).all(), "test bug: the reference is not finite"
    bad = ~torch.isfinite(y)
    assert not bad.any(), f"{int(bad.sum())} of {y.numel()} outputs are NaN/inf, first at {bad.nonzero()[0].tolist()}"

    torch_err = (torch_lowp.double() - ref).abs().max().item()
    kh, kw = args[1].shape[2], args[1].shape[3]
    k_total = kh * kw + x.shape[1] + 3
    allowed = (2 * torch_err
               + (dot_operand_roundoff(x.dtype, tf32) + k_total * 2.0 ** -24) * bound
               + UNIT_ROUNDOFF[x.dtype] * ref.abs())
    err = (y.double() - ref).abs()
    ratio = err / allowed.clamp_min(1e-300)
    worst = int(ratio.argmax())
    idx = list(torch.unravel_index(torch.tensor(worst), ratio.shape))
    comparison = Comparison(err.max().item(), torch_err, ratio.flatten()[worst].item())
    assert comparison.worst_ratio <= 1.0, (
        f"kernel error {comparison.kernel_error:.3e} (PyTorch's own {x.dtype} error {torch_err:.3e}); worst element "
        f"{[int(i) for i in idx]}: got {y.flatten()[worst].item():.6g}, reference {ref.flatten()[worst].item():.6g}, "
        f"allowed error {allowed.flatten()[worst].item():.3e}")
    return comparison


def poison_kernel_outputs(monkeypatch) -> None:
    """Make the Triton launcher allocate its outputs pre-filled with NaN, so a tile the kernel does
    not write fails the comparison instead of showing whatever memory held (docs/testing.md,
    NaN-poisoned outputs)."""
    import math

    from lwkernels.triton import dw_backward as triton_dw_backward, joint_block as triton_kernel

    allocate = triton_kernel.empty_output

    def poisoned(x, shape):
        y = allocate(x, shape)
        y.fill_(math.nan)
        return y

    for module in (triton_kernel, triton_dw_backward):
        monkeypatch.setattr(module, "empty_output", poisoned)  # raises if a launcher renamed it


# -- the case grid ---------------------------------------------------------------------------------
def _case(**kw) -> Case:
    return Case(**kw)


#: Small cases that run in the interpreter in a few tenths of a second each (x fp32/fp16 and the
#: two dense layouts). Channel counts 1, 3, 17, 33 cross the 16-wide tiles; sizes are odd; dilation
#: 1, 2, 3; stride 1 and 2; kernels 1, 3, 5 and 3x5; H or W below the dilated kernel; explicit and
#: asymmetric padding; every epilogue variant; batch 0 and 1.
INTERPRETER_CASES = (
    _case(n=2, c_in=17, c_out=17, h=9, w=9, mid_act="relu", out_act="relu"),
    _case(n=2, c_in=17, c_out=19, h=9, w=11, stride=2, dilation=2, out_act="relu6"),
    _case(n=1, c_in=3, c_out=17, h=7, w=7, dilation=3, mid_act="relu6", out_act="relu", residual="nhwc"),
    _case(n=2, c_in=1, c_out=3, h=5, w=6, stride=2, dilation=3, out_act="none"),
    _case(n=1, c_in=17, c_out=1, h=8, w=5, dilation=2, mid_act="relu", out_act="relu", residual="nchw"),
    _case(n=2, c_in=3, c_out=3, h=6, w=7, kernel=5, stride=2, padding=(0, 1), out_act="relu6"),
    _case(n=1, c_in=20, c_out=33, h=7, w=7, kernel=1, stride=2, padding=0, out_act="relu"),
    _case(n=1, c_in=4, c_out=5, h=4, w=9, kernel=(3, 5), dilation=(1, 2), padding=(2, 1), out_act="none",
          dw_scale=False, dw_shift=False, pw_scale=False, pw_shift=False),
    _case(n=1, c_in=33, c_out=40, h=11, w=13, stride=2, dilation=3, mid_act="relu", out_act="relu6",
          residual="nchw"),
    _case(n=0, c_in=3, c_out=5, h=7, w=7, dilation=3),
    _case(n=2, c_in=17, c_out=19, h=9, w=7, stride=2, dilation=2, mid_act="hardswish", out_act="silu",
          residual="nchw"),
    _case(n=1, c_in=3, c_out=17, h=7, w=8, dilation=3, mid_act="silu", out_act="hardswish"),
)

#: Non-contiguous x (and weights) in the interpreter: slices, permutations, channel windows, stride-0 batch.
INTERPRETER_VIEW_CASES = (
    _case(n=2, c_in=17, c_out=18, h=7, w=6, dilation=2, mid_act="relu", layout="sliced"),
    _case(n=2, c_in=5, c_out=17, h=5, w=7, stride=2, layout="permuted", residual="nhwc"),
    _case(n=2, c_in=17, c_out=3, h=6, w=6, dilation=3, layout="sliced_nhwc", out_act="relu6"),
    _case(n=3, c_in=3, c_out=4, h=5, w=5, layout="expanded"),
)


def gpu_cases() -> List[Case]:
    """The full GPU grid (dtype and dense layout are crossed with it by the test): channel counts
    1, 3, 17, 32, 64, 160 (several C_in chunks and C_out tiles), odd sizes and sizes below the
    dilated kernel, dilation 1, 2, 3, 5, stride 1 and 2, kernels 1, 3, 5, 7 and 3x5, explicit and
    asymmetric padding, every activation and epilogue option, batch 0, 1, 2, 5."""
    cases = []
    for c_in, c_out in ((1, 1), (1, 3), (3, 17), (17, 3), (17, 17), (32, 64), (64, 33), (160, 96)):
        for stride, dilations in ((1, (1, 3)), (2, (2, 5))):
            for dilation in dilations:
                cases.append(_case(n=2, c_in=c_in, c_out=c_out, h=13, w=11, stride=stride, dilation=dilation,
                                   mid_act="relu" if dilation % 2 else "none",
                                   out_act=("relu", "relu6", "none", "hardswish", "silu")[(c_in + dilation) % 5],
                                   residual=("nchw" if dilation == 2 else "nhwc") if c_in == c_out else None))
    cases += [
        _case(n=1, c_in=17, c_out=17, h=3, w=4, dilation=3),            # H, W below the dilated kernel (7)
        _case(n=1, c_in=3, c_out=5, h=1, w=1),                          # 1x1 image
        _case(n=5, c_in=3, c_out=17, h=17, w=9, kernel=5, stride=2, dilation=2, mid_act="relu6"),
        _case(n=2, c_in=17, c_out=17, h=9, w=9, kernel=7, padding=0),
        _case(n=2, c_in=64, c_out=64, h=9, w=13, kernel=(3, 5), dilation=(2, 1), padding=(2, 3), stride=(2, 1)),
        _case(n=2, c_in=17, c_out=33, h=9, w=9, kernel=1, padding=0, stride=2),
        _case(n=2, c_in=33, c_out=17, h=9, w=9, dw_scale=False, dw_shift=False, pw_scale=False, pw_shift=False,
              out_act="none"),
        _case(n=2, c_in=300, c_out=260, h=7, w=7, dilation=3, mid_act="relu", residual="nhwc"),  # > one 256 tile
        _case(n=0, c_in=17, c_out=3, h=9, w=9),
    ]
    return cases


def gpu_grid_subset(cases: List[Case]) -> List[Case]:
    """The cases to run: all, or every third under LWKERNELS_GPU_GRID=quick."""
    size = os.environ.get("LWKERNELS_GPU_GRID", "full")
    if size not in ("full", "quick"):
        raise ValueError(f"LWKERNELS_GPU_GRID must be 'full' or 'quick', got {size!r}")
    return list(cases) if size == "full" else list(cases[::3])


def make_case_args(case: Case, dtype: torch.dtype, layout: str, device="cpu", seed: int = 0) -> List:
    """helpers.make_args for `case` in `dtype` with x laid out as `layout`, on `device` (same strides)."""
    args = make_args(case.with_(dtype=dtype, layout=layout), seed=seed)
    return args_to(args, device) if str(device) != "cpu" else args


def transposed_pointwise(args: Sequence) -> List:
    """The same arguments with pw_weight stored transposed ([C_in, C_out] memory, [C_out, C_in, 1, 1] view)."""
    a = list(args)
    w = a[5]
    a[5] = w.reshape(w.shape[0], w.shape[1]).t().contiguous().t()[:, :, None, None]
    return a
