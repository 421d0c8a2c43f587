"""A replay's prepared calls run by one native call (csrc/call_sequence.h).

LayoutSequential's replay (cpu/prepared_sequence.py) calls its members' prepared kernels one by one
from Python. At batch 1 the Python between them costs more than it does on its own: each kernel
evicts the interpreter's objects from the caches, so a fused MNASNet spent ~0.4 ms of a 3.5 ms call
outside its 19 kernels (docs/performance.md). When every member of the replay is a prepared call
(or passes its input on), the same calls, with the same operands, in the same order and with the
same layout conversions, are bound once into a CallSequence, which then runs them back to back
through two work buffers of its own. The result is what the replay computes, element for element:
the kernels and their arguments are the same; only who calls them changes.

Built for one input signature (shape, dtype, dense layout); a call with anything else, or while
another thread runs this sequence (its work buffers are its own), goes the Python way.
"""
from __future__ import annotations

import threading
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .backend import selected_isa
from .outputs import OutputMaker
from .prepared_call import _dense_layout
from ..ops.contract import output_memory_format

#: Items a replay is made of, in order: ("layout", memory_format) where it converts its current
#: tensor (x.contiguous(memory_format=...)), ("input", (shape, dtype, memory_format)) where a
#: member checks what it is given, ("call", prepared_call, residual_is_input) for a kernel call and,
#: last only, ("head", prepared_head) for a classifier head (cpu/prepared_head.py) whose [N, classes]
#: output is the sequence's.
Item = Tuple


def _degenerate(shape) -> bool:
    """True when NCHW and channels_last lay `shape` out alike (one channel or one pixel), where the
    replay's layout checks see a tensor differently from the layout it was made in."""
    return shape[1] == 1 or shape[2] * shape[3] == 1


class TransposeStep(NamedTuple):
    """A layout transpose of the current tensor: `shape` its NCHW sizes, to NHWC or back."""

    shape: Tuple[int, ...]
    to_nhwc: bool


class CallStep(NamedTuple):
    """A prepared call (`residual_is_input`: it adds its own input to its output). bind_steps() sets
    `writes_transposed` where the call writes its output in the other layout itself, in place of the
    transpose that followed it."""

    call: object
    residual_is_input: bool
    writes_transposed: bool = False


Step = Union[TransposeStep, CallStep]


def _writes_transposed_alike(steps: Sequence[Step], i: int) -> bool:
    """True when steps[i] is an NCHW call without a residual whose output the next step only
    transposes to NHWC, and which gives the same values writing NHWC itself: that saves a pass over
    the whole map (LightweightNet's RGB block at batch 8: 1.63 -> 1.05 ms with its transpose). The
    other way, an NHWC call writing NCHW, measured slower than the separate transpose at batch 8 (a
    chain's last 7x7 block: 2.95 -> 3.06 ms), so sequences keep that transpose."""
    if i + 1 >= len(steps) or not isinstance(steps[i], CallStep) or not isinstance(steps[i + 1], TransposeStep):
        return False
    call, after = steps[i].call, steps[i + 1]
    return (not steps[i].residual_is_input and after.to_nhwc and call.memory_format != torch.channels_last
            and call.writes_transposed_alike and tuple(after.shape) == tuple(call.out_shape))


def bind_steps(_C, dtype: torch.dtype, steps: Sequence[Step]):
    """(a new CallSequence of `steps` in order, the steps it runs), each reading what the one before
    wrote: the input, then the two work buffers in turn, the last writing the output. An NCHW call
    followed by a transpose of its output to NHWC runs as one step writing NHWC (a CallStep with
    writes_transposed)."""
    bound: List[Step] = []
    i = 0
    while i < len(steps):
        if _writes_transposed_alike(steps, i):
            bound.append(steps[i]._replace(writes_transposed=True))
            i += 2
        else:
            bound.append(steps[i])
            i += 1
    seq = (_C.CallSequence_f32 if dtype == torch.float32 else _C.CallSequence_f64)()
    isa = selected_isa()
    src = seq.INPUT
    for i, step in enumerate(bound):
        dst = seq.OUTPUT if i == len(bound) - 1 else (seq.WORK_B if src == seq.WORK_A else seq.WORK_A)
        if isinstance(step, TransposeStep):
            n, c, h, w = step.shape
            seq.add_transpose(n, c, h * w, step.to_nhwc, isa, src, dst)
        elif step.writes_transposed:
            step.call.append_to(seq, src, seq.NO_SLOT, dst, transposed=True)
        else:
            step.call.append_to(seq, src, src if step.residual_is_input else seq.NO_SLOT, dst)
        src = dst
    return seq, tuple(bound)


def items_output(items: Sequence[Item], x: torch.Tensor) -> Tuple[Tuple[int, ...], torch.memory_format]:
    """(shape, memory format) of what `items` leave for an input like `x`: where a head appended to
    them would read (NativeSequence.build checks that the items chain)."""
    shape, fmt = tuple(x.shape), output_memory_format(x)
    for item in items:
        if item[0] == "layout":
            fmt = item[1]
        elif item[0] == "call":
            shape, fmt = tuple(item[1].out_shape), item[1].memory_format
    return shape, fmt


def step_label(step: Step) -> str:
    """What a bind_steps() step is, for profiles: the prepared call's kind and shapes, or a transpose."""
    if isinstance(step, TransposeStep):
        return f"transpose {'NCHW->NHWC' if step.to_nhwc else 'NHWC->NCHW'} {tuple(step.shape)}"
    call = step.call
    label = f"{type(call).__name__} {tuple(call.x_shape)} -> {tuple(call.out_shape)}"
    return label + " NHWC out" if step.writes_transposed else label


class StepTiming:
    """Per-call wall times inside one native call, where forward hooks see nothing (profiling: a
    model's fused modules are not called one by one on this path). For classes holding the
    CallSequence in `_seq` and the bind_steps() steps it was made of in `_steps`."""

    __slots__ = ()

    def step_labels(self) -> List[str]:
        """What each call of the sequence is, in order: the labels of step_seconds()."""
        return [step_label(step) for step in self._steps]

    def time_steps(self, on: bool = True) -> None:
        """Record every call's wall time in the runs that follow (a clock read per call), or stop;
        either way the last run's times are dropped."""
        self._seq.set_step_timing(on)

    def step_seconds(self) -> List[float]:
        """Seconds each call took in the last run while time_steps() was on (summed over the image
        groups); empty before such a run."""
        return list(self._seq.step_seconds)

    def step_threads(self) -> List[Dict[str, float]]:
        """How each call of that run spent its threads' time (summed over the image groups), for
        finding where threads wait: ``alone`` seconds the calling thread worked outside parallel
        regions (set-up, serial parts) while the others waited, ``region`` seconds inside them,
        ``busy`` seconds the tasks ran (summed over threads) and ``idle`` thread-seconds inside the
        regions without a task to run (threads * region - busy: uneven shares, start and end of a
        region). Empty before such a run."""
        seq = self._seq
        threads = seq.step_threads
        return [{"alone": max(0.0, wall - region), "region": region, "busy": busy,
                 "idle": max(0.0, threads * region - busy)}
                for wall, region, busy in zip(seq.step_seconds, seq.step_region_seconds, seq.step_busy_seconds)]


class NativeSequence(StepTiming):
    """The calls of a replay as one CallSequence for one input signature; see the module docstring."""

    __slots__ = ("_seq", "_x_shape", "_dtype", "_memory_format", "_lock", "_calls", "_steps", "_outputs")

    @classmethod
    def build(cls, items: Sequence[Item], x: torch.Tensor, _C) -> "Optional[NativeSequence]":
        """The sequence of `items` for inputs like `x`; None when some item has no native form (a layout
        change of a degenerate shape, a member given something it would not replay) or no call."""
        if type(x) is not torch.Tensor or x.dim() != 4 or x.dtype not in (torch.float32, torch.float64):
            return None
        fmt = output_memory_format(x)
        if not _dense_layout(x, fmt) or _degenerate(x.shape):
            return None
        ops: List[Step] = []
        shape, dtype = tuple(x.shape), x.dtype
        for item in items:
            kind = item[0]
            if kind == "layout":
                if item[1] != fmt:
                    if _degenerate(shape):
                        return None
                    ops.append(TransposeStep(shape, item[1] == torch.channels_last))
                    fmt = item[1]
            elif kind == "input":
                want_shape, want_dtype, want_fmt = item[1]
                if tuple(want_shape) != shape or want_dtype != dtype or want_fmt != fmt:
                    return None
            elif kind == "head":
                head = item[1]
                if item is not items[-1] or tuple(head.x_shape) != shape or head.dtype != dtype \
                        or head.memory_format != fmt:
                    return None
                ops.append(CallStep(head, False))
                shape, fmt = tuple(head.out_shape)[:2], torch.contiguous_format
            else:
                _, call, residual_is_input = item
                if tuple(call.x_shape) != shape or call.dtype != dtype or call.memory_format != fmt:
                    return None
                ops.append(CallStep(call, residual_is_input))
                shape, fmt = tuple(call.out_shape), call.memory_format
                if _degenerate(shape):
                    return None
        if not any(isinstance(op, CallStep) for op in ops):
            return None
        seq, steps = bind_steps(_C, dtype, ops)
        plan = cls.__new__(cls)
        plan._seq = seq
        plan._x_shape, plan._dtype, plan._memory_format = x.shape, x.dtype, output_memory_format(x)
        plan._calls = tuple(op.call for op in ops if isinstance(op, CallStep))  # the operands' owners stay alive
        plan._steps = steps
        plan._outputs = OutputMaker(_C, shape, dtype, fmt)
        plan._lock = threading.Lock()
        return plan

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of the inputs it takes (and of its output: the replay restores it)."""
        return self._memory_format

    def matches(self, x: torch.Tensor) -> bool:
        return type(x) is torch.Tensor and x.shape == self._x_shape and x.dtype == self._dtype and x.is_cpu \
            and _dense_layout(x, self._memory_format)

    def run(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The sequence's output for `x` (which matches()); None while another thread runs it."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            y = self._outputs.take()
            self._seq.run(x.data_ptr(), y.data_ptr(), torch.get_num_threads())
            return y
        finally:
            self._lock.release()

    def __len__(self) -> int:
        return len(self._seq)


def native_plans(model) -> List[StepTiming]:
    """The native sequences `model`'s fused containers have prepared so far (LayoutSequential
    replays, JointChain plans with or without their head, a fused classifier's body and head), for
    profiling with StepTiming."""
    from ..nn.classifier_forward import installed  # (nn imports cpu: only at call time)

    plans: List[StepTiming] = []
    for module in model.modules():
        head = installed(module)
        if head is not None:
            plans += [plan.native for plan in head.plans()]
        for layout_plan in module.__dict__.get("_layout_plans", {}).values():
            replay = layout_plan.replay
            native = replay._native if replay is not None else None
            if native:
                plans.append(native)
        for key in ("_plan", "_head_plan"):
            chain_plan = module.__dict__.get(key)
            if chain_plan is not None and chain_plan._seq is not None:  # (None: cleared)
                plans.append(chain_plan)
    return plans
