"""LayoutSequential's replay: its members' prepared kernel calls run back to back for one input
signature, without the module calls around them.

Called as modules, the fused blocks of a torchvision MobileNetV2 spend as long in Python as in
their kernels at batch 1 on a small image: each member goes through nn.Module.__call__ for every
container and nn.Identity that fuse() left in it, and every fused module checks on its own that its
prepared call still applies (docs/performance.md). The replay does those checks once per call, for
all members together, and then calls the prepared kernels directly.

Which members qualify is nn/member_calls.py's analysis (the forward of each module on the way is
known); the others are called as modules, in the same order, so a member whose forward is not
known costs what it did. A replay is prepared right after the members have run the input the normal
way in the layouts the container chose, from the calls their fused modules prepared then; it
replays while
  - the member analysis still holds (classes, children, no forward set on an instance, flags) and
    nothing it walked has hooks (nor are there global ones),
  - every prepared call's state watch is unchanged and the instruction-set setting is the same,
  - nothing must see the ops (ops.inference.dispatcher_needed; the container runs it under no_grad
    only), and
  - each replayed member's input has the shape, dtype and layout its first call was prepared for
    (a member given anything else is called as a module).
Anything else runs the members as modules (which prepare their calls again).

When every member is a prepared call (or passes its input on), the replay itself runs as one
native call (cpu/native_sequence.py) for the input signature of its first run.
"""
from __future__ import annotations

import weakref
from typing import List, Optional, Sequence, Tuple

import torch
from torch.nn.modules import module as _module_globals

from ..nn.conv_bn_act import ConvBNAct
from ..nn.member_calls import member_calls
from ..ops.inference import dispatcher_needed, modes_active
from .backend import isa_env, native as _native_module
from .native_sequence import NativeSequence
from .prepared_call import PreparedCall, _dense_layout
from .prepared_dense_conv import PreparedDenseConv
from .prepared_inverted_residual import PreparedInvertedResidual
from .state_watch import StateWatch

#: Every live PreparedSequence, so that lwkernels.clear_cache() can drop them.
_LIVE: "weakref.WeakSet[PreparedSequence]" = weakref.WeakSet()

#: One replayed member: the signature of its input (shape, dtype, memory format) and its calls,
#: each (run(x, residual) -> y, whether it gets its input as the residual, the prepared call);
#: (None, ()) for a member that only passes its input on (nn.Identity).
_Member = Tuple[Tuple[torch.Size, torch.dtype, torch.memory_format], Tuple[Tuple[object, bool, object], ...]]


def _prepared_run(module, residual_is_input: bool):
    """(the call `module` prepared when it last ran, its run function taking (x, residual)); None when
    it has none a replay may use."""
    call = module.__dict__.get("_prepared")
    if type(module) is ConvBNAct:
        if not isinstance(call, PreparedDenseConv) or residual_is_input:
            return None
        return call, lambda x, _residual, run=call.run: run(x)
    if not isinstance(call, (PreparedCall, PreparedInvertedResidual)) or call.has_residual != residual_is_input:
        return None
    return call, call.run


class PreparedSequence:
    """A LayoutSequential's replay for one input signature; see the module docstring."""

    __slots__ = ("_members", "_formats", "_steps", "_watch", "_isa_env", "_valid", "_native",
                 "__weakref__")

    #: Whether replays whose members are all prepared calls run as one native call
    #: (cpu/native_sequence.py); tests turn it off to compare with the calls made from Python.
    use_native = True

    @classmethod
    def prepare(cls, members: Sequence[torch.nn.Module],
                formats: Sequence[Optional[torch.memory_format]]) -> "Optional[PreparedSequence]":
        """The replay of `members`, each given its input in `formats` (None: as it comes), right after
        they ran that way; None when no member can be replayed."""
        isa_setting = isa_env()
        steps: List[Optional[_Member]] = []
        watches: List[StateWatch] = []
        for member in members:
            found = member_calls(member)
            step = None if found is None else cls._member_step(found.calls, isa_setting)
            if step is None:
                steps.append(None)
                continue
            calls, call_watches = step
            steps.append(calls)
            watches += (found.watch,) + call_watches
        if not any(step is not None and step[1] for step in steps):
            return None
        plan = cls.__new__(cls)
        plan._members, plan._formats, plan._steps = tuple(members), tuple(formats), tuple(steps)
        plan._watch = StateWatch.union(watches)
        plan._isa_env = isa_setting
        plan._native = None  # built on the first run, for its input's signature
        plan._valid = True
        _LIVE.add(plan)
        return plan

    @staticmethod
    def _member_step(fused_calls, isa_setting) -> Optional[Tuple[_Member, Tuple[StateWatch, ...]]]:
        """A member's prepared calls, chained (each takes the previous one's output), with the watches
        they need; None when one is missing or they do not chain."""
        if not fused_calls:
            return (None, ()), ()  # (nn.Identity and containers of them: nothing to run)
        runs, watches = [], ()
        signature = None
        previous = None
        for module, residual_is_input in fused_calls:
            found = _prepared_run(module, residual_is_input)
            if found is None:
                return None
            call, run = found
            call_watches, call_isa_env = call.replay_state()
            if call_isa_env != isa_setting:
                return None
            if previous is None:
                signature = (call.x_shape, call.dtype, call.memory_format)
            elif tuple(call.x_shape) != tuple(previous.out_shape) or call.dtype != previous.dtype \
                    or call.memory_format != previous.memory_format:
                return None
            runs.append((run, residual_is_input, call))
            watches += call_watches
            previous = call
        return (signature, tuple(runs)), watches

    def matches(self, eager_checked: bool = False) -> bool:
        """True when replaying gives what calling the members it was prepared from would (the caller
        holds those members and checks that the container still does; the input is checked per
        member). eager_checked: the caller has just seen that nothing compiles or traces, so only
        modes and transforms are left to check."""
        if not self._valid:
            return False
        g = _module_globals
        if g._global_forward_hooks or g._global_forward_pre_hooks:
            return False
        return self._watch.unchanged() and isa_env() == self._isa_env \
            and not (modes_active() if eager_checked else dispatcher_needed())

    def native_items(self) -> Optional[list]:
        """The replay as NativeSequence items; None when a member is called as a module."""
        items = []
        for fmt, step in zip(self._formats, self._steps):
            if fmt is not None:
                items.append(("layout", fmt))
            if step is None:
                return None
            signature, runs = step
            if runs:
                items.append(("input", signature))
                items += [("call", call, residual_is_input) for _run, residual_is_input, call in runs]
        return items

    def run(self, x: torch.Tensor, out_format: torch.memory_format) -> torch.Tensor:
        """The members' output for `x`, a 4-D one in `out_format`: x's own memory format (the
        caller, LayoutSequential, has checked that x is a CPU tensor dense in it, of the shape and
        dtype this replay was prepared for)."""
        native = self._native
        if native is None:
            items = self.native_items() if self.use_native else None
            if items is not None:
                items.append(("layout", out_format))
            native = self._native = (items is not None and NativeSequence.build(items, x, _native_module())) or False
        if native and type(x) is torch.Tensor and native.memory_format == out_format:
            y = native.run(x)
            if y is not None:
                return y
        for member, fmt, step in zip(self._members, self._formats, self._steps):
            if fmt is not None and type(x) is torch.Tensor and x.dim() == 4:
                x = x.contiguous(memory_format=fmt)
            if step is None:
                x = member(x)
                continue
            signature, runs = step
            if not runs:
                continue
            shape, dtype, memory_format = signature
            if type(x) is not torch.Tensor or x.shape != shape or x.dtype != dtype or not x.is_cpu \
                    or not _dense_layout(x, memory_format):
                x = member(x)  # (its modules check and prepare for what they are given)
                continue
            for run, residual_is_input, _call in runs:
                x = run(x, x if residual_is_input else None)
        if isinstance(x, torch.Tensor) and x.dim() == 4:  # (a classifier's output has no layout)
            x = x.contiguous(memory_format=out_format)
        return x

    def invalidate(self) -> None:
        self._valid = False
        self._native = False  # (frees its work buffers)


def invalidate_all() -> None:
    """Drop every prepared sequence (lwkernels.clear_cache())."""
    for plan in list(_LIVE):
        plan.invalidate()
