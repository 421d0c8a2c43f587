"""LayoutSequential: an nn.Sequential whose members run in the memory layout their kernels are
fastest in, converting between layouts only where that changes and back at its end.

Which layout is faster depends on the block's shape (docs/performance.md, "Layouts inside a
model"): the NCHW kernels win on large images (a 56x56 or larger output, and the dense image stem),
the NHWC inverted-residual kernels from 28x28 down (their depthwise runs along channels, so a small
image loses no vector lanes at row ends, and they need no padded copy of each channel plane). A model
written in NCHW (torchvision's MobileNetV2, MNASNet) therefore runs its later stages channels-last
inside this container and hands back NCHW. A lone JointBlock gains too little from either layout
to pay for a conversion, so it runs in the layout it is given; a run of four or more wide ones (a
depthwise-separable stack such as MobileNetV1's) runs channels-last, as JointChain does.
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..cpu.prepared_sequence import PreparedSequence
from ..ops.contract import conv_output_size
from ..ops.inference import is_tracing
from .block import JointBlock
from .conv_bn_act import ConvBNAct
from .inverted_residual import InvertedResidual
from .retry_schedule import RetrySchedule

#: Inverted residuals with at most this many output pixels run channels-last when their depthwise
#: kernel has at most 9 taps (3x3), ...
CHANNELS_LAST_MAX_PIXELS = 28 * 28
#: ... and with any kernel at most this many (5x5 and larger depthwise kernels read 25+ taps per
#: pixel, which the NHWC kernel loads one vector pair each; NCHW shares them along a row).
CHANNELS_LAST_MAX_PIXELS_LARGE_KERNEL = 14 * 14

_CL = torch.channels_last
_NCHW = torch.contiguous_format


def _out_pixels(conv: nn.Conv2d, h: int, w: int) -> Optional[int]:
    if isinstance(conv.padding, str):
        return None
    oh, ow = (conv_output_size(n, conv.kernel_size[i], conv.stride[i], conv.padding[i], conv.dilation[i])
              for i, n in enumerate((h, w)))
    return oh * ow


def preferred_memory_format(module: nn.Module, in_shape: Sequence[int]) -> Optional[torch.memory_format]:
    """The memory format `module` (one of lwkernels' fused modules) runs fastest in on an input of
    `in_shape`; None when it runs about as fast in either (a 1x1 ConvBNAct), so the layout it is
    given stays."""
    h, w = int(in_shape[-2]), int(in_shape[-1])
    if isinstance(module, ConvBNAct):
        return None if tuple(module[0].kernel_size) == (1, 1) else _NCHW
    is_ir = isinstance(module, InvertedResidual)
    dw = module[1].depthwise if is_ir else module.depthwise
    px = _out_pixels(dw, h, w)
    if px is None:
        return _NCHW
    taps = dw.kernel_size[0] * dw.kernel_size[1]
    limit = CHANNELS_LAST_MAX_PIXELS if taps <= 9 else CHANNELS_LAST_MAX_PIXELS_LARGE_KERNEL
    if px > limit:
        return _NCHW
    # A JointBlock on a small image runs about as fast in either layout, so converting for it
    # never pays: it keeps what it is given (docs/performance.md, "Layouts inside a model").
    return _CL if is_ir else None


_FUSED = (InvertedResidual, JointBlock, ConvBNAct)

#: At least this many consecutive JointBlock members with at least JOINT_RUN_MIN_CHANNELS input
#: channels run channels-last (float32), as in a JointChain: together their NHWC kernels gain more
#: than the two conversions around them cost (fewer lose: cpu/prepared_chain.py says by how much).
JOINT_RUN_MIN_BLOCKS = 4
JOINT_RUN_MIN_CHANNELS = 16


def _fused_within(module: nn.Module) -> List[nn.Module]:
    """`module` itself when it is a fused module, else the fused modules inside it (not inside
    each other)."""
    if isinstance(module, _FUSED):
        return [module]
    found: List[nn.Module] = []
    for child in module.children():
        found += _fused_within(child)
    return found


def _member_format(member: nn.Module, shapes: Dict[int, Tuple[int, ...]]) -> Optional[torch.memory_format]:
    """The layout a member is given: its fused modules' choice when they agree (None: whatever
    the previous member returned); NCHW when they do not, or for a member without fused modules
    that has parameters (a PyTorch convolution: keep the layout the model was written for);
    None for one without (an activation, nn.Identity)."""
    fused = _fused_within(member)
    if not fused:
        has_params = next(member.parameters(), None) is not None
        return _NCHW if has_params else None
    choices = {preferred_memory_format(m, shapes[id(m)]) for m in fused if id(m) in shapes}
    choices.discard(None)
    if len(choices) == 1:
        return choices.pop()
    return _NCHW if choices else None


def _joint_runs_channels_last(members, shapes, formats, dtype: torch.dtype) -> List[Optional[torch.memory_format]]:
    """`formats` with every run of JOINT_RUN_MIN_BLOCKS or more consecutive wide JointBlock members
    (which alone keep the layout they are given) set to channels-last, for float32."""
    formats = list(formats)
    if dtype != torch.float32:
        return formats

    def wide(m) -> bool:
        shape = shapes.get(id(m))
        return type(m) is JointBlock and shape is not None and shape[1] >= JOINT_RUN_MIN_CHANNELS \
            and shape[2] * shape[3] > 1

    i = 0
    while i < len(members):
        j = i
        while j < len(members) and wide(members[j]):
            j += 1
        if j - i >= JOINT_RUN_MIN_BLOCKS:
            formats[i:j] = [_CL] * (j - i)
        i = max(j, i + 1)
    return formats


class LayoutSequential(nn.Sequential):
    """``nn.Sequential(*members)`` that runs each member in the memory layout its kernels are
    fastest in (see the module docstring), then returns its output in the input's memory format.

    Everything else is nn.Sequential's: indexing, state_dict keys, training, autograd,
    ``torch.compile``, ``torch.export`` and ONNX export (which trace the plain sequence). The layouts
    are chosen in eager CPU inference (nothing needing grad) for 4-D float32/float64 input in NCHW or
    channels_last; on the first call with a new input shape the members run as a plain
    nn.Sequential while the shapes their fused modules see are recorded. Only layouts change: each
    member computes the same values (to float rounding: NCHW and NHWC kernels may round
    differently), and forward hooks still run, seeing the member's input in the layout chosen for it.
    Once the members have run in their layouts, later calls replay them: members whose forward is
    known to do nothing but call fused modules (nn/member_calls.py) run as those modules' prepared
    kernel calls, without the module calls in between (cpu/prepared_sequence.py); the results are
    the same, and anything the modules would notice (hooks, changed parameters or children) makes
    the members run as modules again.
    fuse() puts the containers of a model that hold lwkernels' fused blocks in one of these.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not layouts_apply(x):
            return super().forward(x)
        members = tuple(self._modules.values())
        plans = self.__dict__.setdefault("_layout_plans", {})
        key = (tuple(x.shape), x.dtype)
        plan = plans.get(key)
        if plan is None or len(plan.members) != len(members) or not all(map(operator.is_, plan.members, members)):
            if len(plans) >= _MAX_PLANS:
                plans.clear()
            y, formats = self._run_recording(x, members)
            plans[key] = _Plan(members, formats)
            return y
        out_format = _NCHW if x.is_contiguous() else _CL
        if REPLAY_MEMBERS and plan.replayable():
            return plan.replay.run(x, out_format)  # (in out_format already)
        y = self._run_in_layouts(x, members, plan.formats)
        if REPLAY_MEMBERS:
            plan.ran_as_modules()
        if isinstance(y, torch.Tensor) and y.dim() == 4:  # (a classifier's output has no layout to restore)
            y = y.contiguous(memory_format=out_format)
        return y

    @staticmethod
    def _run_in_layouts(x, members, formats):
        for member, fmt in zip(members, formats):
            if fmt is not None and isinstance(x, torch.Tensor) and x.dim() == 4:
                x = x.contiguous(memory_format=fmt)
            x = member(x)
        return x

    def _run_recording(self, x: torch.Tensor, members) -> Tuple[torch.Tensor, List[Optional[torch.memory_format]]]:
        """The plain nn.Sequential call, recording the input shape of every fused module in the
        members; returns its output and the layout chosen for each member."""
        shapes: Dict[int, Tuple[int, ...]] = {}

        def record(module, args):
            if args and isinstance(args[0], torch.Tensor):
                shapes[id(module)] = tuple(args[0].shape)

        handles = [f.register_forward_pre_hook(record) for m in members for f in _fused_within(m)]
        try:
            y = super().forward(x)
        finally:
            for h in handles:
                h.remove()
        formats = [_member_format(m, shapes) for m in members]
        return y, _joint_runs_channels_last(members, shapes, formats, x.dtype)

    def as_sequential(self) -> nn.Sequential:
        """This container as a plain nn.Sequential again (the same object; its plans dropped)."""
        self.__dict__.pop("_layout_plans", None)
        self.__class__ = nn.Sequential
        return self

    def __getstate__(self):
        # The plans hold the members themselves: never pickle or deep-copy them.
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_layout_plans", None)
        return state


#: Whether a LayoutSequential replays its members' prepared calls (cpu/prepared_sequence.py) rather
#: than calling them as modules: a switch for tests and side-by-side measurements, not a setting.
REPLAY_MEMBERS = True

#: Input signatures a LayoutSequential keeps plans for (a few image sizes and batch sizes).
_MAX_PLANS = 8


class _Plan:
    """One input signature's layouts per member and, once its members have run in them, their
    replay (cpu/prepared_sequence.py), prepared again on the schedule of nn/retry_schedule.py."""

    __slots__ = ("members", "formats", "replay", "_schedule")

    def __init__(self, members, formats) -> None:
        self.members, self.formats = members, formats
        self.replay = None
        self._schedule = RetrySchedule()

    def replayable(self) -> bool:
        """True when the replay gives what calling the members would (the caller has checked that
        the container still holds them); drops a stale one."""
        replay = self.replay
        if replay is None:
            return False
        if replay.matches(eager_checked=True):  # (forward() has just run layouts_apply)
            self._schedule.replayed()
            return True
        self.replay = None
        self._schedule.went_stale()
        return False

    def ran_as_modules(self) -> None:
        """The members have just run as modules in these layouts (so their fused modules hold
        calls prepared for them): prepare the replay when a try is due."""
        if not self._schedule.try_due():
            return
        replay = PreparedSequence.prepare(self.members, self.formats)
        if replay is not None and replay.matches():
            self.replay = replay
            self._schedule.prepared()
        else:
            self._schedule.failed()


def layouts_apply(x) -> bool:
    """Eager CPU inference on a 4-D float tensor in NCHW or channels_last. (ONNX export needs no
    check of its own: the TorchScript exporter traces with torch.jit, the dynamo one goes through
    torch.export, which sets is_compiling(); torch.onnx.is_in_onnx_export() imports two modules on
    every call, ~40 us once a model's kernels have evicted them.)"""
    return (isinstance(x, torch.Tensor) and x.is_cpu and x.dim() == 4
            and x.dtype in (torch.float32, torch.float64) and not torch.is_grad_enabled()
            and not (torch.compiler.is_compiling() or is_tracing())
            and (x.is_contiguous() or x.is_contiguous(memory_format=_CL)))
