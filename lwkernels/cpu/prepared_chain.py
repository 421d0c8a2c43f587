"""JointChain's eager CPU inference fast path: consecutive JointBlocks run back to back, from one
native call, on two work buffers.

Called one by one, every block returns a fresh tensor. PyTorch hands allocations of this size to the
C library's malloc, which maps large blocks afresh and gives memory back to the operating system when
enough is free, so in a typical process each call pages every intermediate in again: about 1,500 page
faults and a third of a LightweightNet call at batch 1 (docs/performance.md). A PreparedChain binds
the blocks' prepared calls into a native CallSequence (csrc/call_sequence.h), which lays the
intermediates in its two work buffers, alternately (each block reads one and writes the other), so a
call allocates only its output and crosses from Python into the kernels once. The buffers are sized
once per input signature and freed with the plan (a new signature, lwkernels.clear_cache(), or the
chain itself going away).

In a chain of at least CHANNELS_LAST_MIN_BLOCKS float32 blocks with at least
CHANNELS_LAST_MIN_CHANNELS input channels, those blocks run channels-last inside the sequence
whatever the caller's layout: their NHWC kernels are faster (a 64->128 stride-2 block on a 112x112
image: 0.29 -> 0.22 ms, the deep 14x14 and 7x7 blocks 2-8%), which pays for the two transposes (one
in, one back) once there are enough blocks: chains of 4 same-shape blocks ran 3-8% faster, of 6
6-12%, of 3 between 4% slower and 6% faster, of 1 or 2 up to 35% slower (docs/performance.md).
Narrower blocks (an RGB input) keep the caller's layout, since an NHWC depthwise over 3 channels
wastes most of each vector. The NCHW and NHWC kernels sum in different orders, so JointChain's
block-by-block eager path (its first call) converts to the same layouts, and the replay returns
exactly what that path returns.

The plan is replayed while
  - the chain holds the same JointBlock objects (plain JointBlock.forward, no forward hooks on them
    and no global forward hooks: the replay does not call them), and a stem the same modules,
  - every block's prepared call still matches its block (same modules, parameters at the same
    version, same settings; the same instruction-set choice),
  - x has the signature it was prepared for, nothing needs autograd (no grad, or nothing requires
    it), and nothing needs to see the ops (ops.inference.dispatcher_needed),
  - no other thread is running the same plan (the buffers are the plan's; a concurrent caller goes
    block by block instead).
Anything else runs the blocks one by one, each with its own checks and errors. The checks on modules
(the chain's and the stem's children, their classes and hook dicts, and what every call read) are one
state watch, checked in one native pass: after a model's kernels, the interpreter's objects are cold
in the caches, and the same checks walked in Python cost ~0.1 ms of a MobileNetV1 call at batch 1.
"""
from __future__ import annotations

import threading
import weakref
from typing import List, Optional, Tuple

import torch
from torch.nn.modules import module as _module_globals

from ..ops.contract import output_memory_format
from ..ops.inference import dispatcher_needed
from ..nn.folding import uses_running_stats
from .backend import isa_env, native
from .native_sequence import CallStep, Step, StepTiming, TransposeStep, bind_steps
from .outputs import OutputMaker
from .prepared_call import PreparedCall, _dense_layout
from .prepared_dense_conv import PreparedDenseConv
from .prepared_head import PreparedHead
from .state_watch import StateWatch

#: Every live PreparedChain, so that lwkernels.clear_cache() can drop them (and their buffers).
_LIVE: "weakref.WeakSet[PreparedChain]" = weakref.WeakSet()

#: Blocks with at least this many input channels run channels-last inside a chain of at least
#: CHANNELS_LAST_MIN_BLOCKS of them (module docstring).
CHANNELS_LAST_MIN_CHANNELS = 16
CHANNELS_LAST_MIN_BLOCKS = 4


def runs_channels_last(blocks, dtype: torch.dtype) -> bool:
    """Whether a chain of `blocks` on `dtype` inputs runs its wide blocks channels-last (module
    docstring)."""
    wide = sum(b.depthwise.in_channels >= CHANNELS_LAST_MIN_CHANNELS for b in blocks)
    return dtype == torch.float32 and wide >= CHANNELS_LAST_MIN_BLOCKS


def _view(flat: torch.Tensor, shape: Tuple[int, int, int, int], memory_format) -> torch.Tensor:
    """A tensor of `shape`, dense in `memory_format`, at the start of the buffer `flat`."""
    n, c, h, w = shape
    head = flat[: n * c * h * w]
    if memory_format == torch.channels_last:
        return head.view(n, h, w, c).permute(0, 3, 1, 2)
    return head.view(n, c, h, w)


def inner_format(in_shape, channels_last: bool, caller_format: torch.memory_format) -> torch.memory_format:
    """The memory format a chain's block runs in when it reads a tensor of `in_shape`, given
    runs_channels_last() of the chain (module docstring). JointChain's block-by-block eager path
    converts to it too, so that the replay gives the same bits. A shape with one channel or one
    pixel is laid out alike in both layouts; it keeps the caller's."""
    if channels_last and in_shape[1] >= CHANNELS_LAST_MIN_CHANNELS and in_shape[2] * in_shape[3] != 1:
        return torch.channels_last
    return caller_format


class PreparedChain(StepTiming):
    """The fused calls of one chain of JointBlocks for one input signature; see the module docstring."""

    __slots__ = ("_chain", "_blocks", "_calls", "_head", "_stem", "_parts", "_seq", "_steps", "_x_shape",
                 "_dtype", "_memory_format", "_outputs", "_lock", "_watch", "_isa_env", "_valid", "__weakref__")

    @classmethod
    def prepare(cls, chain: torch.nn.Module, x: torch.Tensor,
                out_shapes: List[Tuple[int, int, int, int]], head: Optional[PreparedHead] = None,
                stem: Optional[Tuple[torch.nn.Module, PreparedDenseConv]] = None) -> "Optional[PreparedChain]":
        """The plan for the blocks of `chain` (a JointChain) called in turn on `x`, right after they
        have been, giving outputs of `out_shapes`; None when the calls cannot be replayed safely.
        Each block must have taken its fused eval path just now: its own prepared call (block.py)
        exists and still matches. With `head` (prepared for the last block's output in the layout
        the chain runs it in), the plan's sequence ends with the classifier head instead of the
        chain's output (JointChain.classify); with `stem` too, (a ConvBNAct, its prepared call whose
        output is x), it starts with the stem's call and takes the stem's input."""
        blocks = list(chain._modules.values())
        if not blocks or type(x) is not torch.Tensor or (stem is not None and head is None):
            return None
        for block in blocks:
            call = block.__dict__.get("_prepared")
            if call is None or not call.state_unchanged() or not uses_running_stats(block.bn) \
                    or not uses_running_stats(block.mid_bn):
                return None
        memory_format = output_memory_format(x)
        if not _dense_layout(x, memory_format):
            return None
        plan = cls.__new__(cls)
        return plan if plan._init(chain, blocks, x, out_shapes, memory_format, head, stem) else None

    def _init(self, chain, blocks, x, out_shapes, memory_format, head, stem) -> bool:
        self._chain = weakref.ref(chain)  # (the chain holds the plan: no reference cycle)
        self._blocks = tuple(blocks)
        self._head = head
        self._stem = stem
        self._x_shape, self._dtype, self._memory_format = x.shape, x.dtype, memory_format
        # Each call is prepared on a view laid out as what it will read in the sequence, so that its
        # layout checks see what the replay does (the addresses are bound by the sequence).
        in_shapes = [tuple(x.shape)] + [tuple(s) for s in out_shapes[:-1]]
        cl = runs_channels_last(blocks, x.dtype)
        formats = [inner_format(shape, cl, memory_format) for shape in in_shapes]
        numel = max(s[0] * s[1] * s[2] * s[3] for s in in_shapes)
        scratch = torch.empty(numel, dtype=x.dtype)
        self._calls: List[PreparedCall] = []
        for i, (block, shape, fmt, out_shape) in enumerate(zip(blocks, in_shapes, formats, out_shapes)):
            source = x if i == 0 and fmt == memory_format else _view(scratch, shape, fmt)
            call = PreparedCall.prepare(block, source, None, block._folded_epilogues(), out_shape)
            if call is None or call.memory_format != fmt:
                return False
            self._calls.append(call)
        # The same calls, bound in order: input -> work buffers, alternately -> output, with a
        # transpose wherever the layout changes and one back to the caller's at the end.
        steps: List[Step] = []
        if stem is not None:
            stem_call = stem[1]
            if tuple(stem_call.out_shape) != tuple(x.shape) or stem_call.dtype != x.dtype \
                    or stem_call.memory_format != memory_format:
                return False
            steps.append(CallStep(stem_call, False))
        fmt = memory_format
        for call, shape, want in zip(self._calls, in_shapes, formats):
            if want != fmt:
                steps.append(TransposeStep(shape, want == torch.channels_last))
                fmt = want
            steps.append(CallStep(call, False))
        end_format = memory_format if head is None else head.memory_format
        if fmt != end_format:
            steps.append(TransposeStep(tuple(out_shapes[-1]), end_format == torch.channels_last))
        if head is not None:
            if tuple(head.x_shape) != tuple(out_shapes[-1]) or head.dtype != x.dtype:
                return False
            steps.append(CallStep(head, False))
        self._seq, self._steps = bind_steps(native(), x.dtype, steps)
        # Every prepared call the sequence runs, in order (the watch, validity and grad checks).
        self._parts = tuple(([] if stem is None else [stem[1]]) + self._calls + ([] if head is None else [head]))
        if stem is not None:  # (the plan takes the stem's input)
            self._x_shape, self._memory_format = stem[1].x_shape, stem[1].memory_format
        # What every call read, checked in one pass per chain call (not one per block).
        states = [call.replay_state() for call in self._parts]
        self._isa_env = states[0][1]
        if any(isa_env != self._isa_env for _, isa_env in states):
            return False
        self._watch = StateWatch.union([w for watches, _ in states for w in watches] + [self._structure(stem)])
        last = self._parts[-1]
        # (a head's output made 2-D here: a flatten after the call found PyTorch's dispatcher
        # evicted by the kernels and cost 20-75 us)
        out_shape, out_format = (last.out_shape, memory_format) if head is None else \
            (tuple(last.out_shape)[:2], torch.contiguous_format)
        self._outputs = OutputMaker(native(), out_shape, x.dtype, out_format)
        self._lock = threading.Lock()
        self._valid = True
        _LIVE.add(self)
        return True

    def _structure(self, stem) -> StateWatch:
        """What the replay skips calling: the chain's blocks (the same objects, each keeping its class
        and no hooks) and the stem's modules (likewise), checked with the calls' state in one pass."""
        watch = StateWatch()
        chain = self._chain()
        watch.watch(chain._modules, tuple(chain._modules))
        modules = list(self._blocks)
        if stem is not None:
            stem_module = stem[0]
            watch.watch(stem_module._modules, tuple(stem_module._modules))
            modules += [stem_module] + list(stem_module._modules.values())
        for module in modules:
            watch.watch_class(module)
            watch.watch_empty(module._forward_hooks)
            watch.watch_empty(module._forward_pre_hooks)
        return watch

    def matches(self, chain, x: torch.Tensor, head_modules: Tuple = (), stem=None) -> bool:
        """True when replaying gives exactly what calling the blocks of `chain` in turn (and the head
        of `head_modules`, (pool, dropout, linear), for a plan with a head; the stem module first,
        for a plan with a stem) would. (A replay runs right after a model's kernels evicted the
        interpreter's data: every check here is one that the state watch cannot make.)"""
        if not self._valid or chain is not self._chain() or len(chain._modules) != len(self._blocks) \
                or type(x) is not torch.Tensor or x.shape != self._x_shape or x.dtype != self._dtype or not x.is_cpu \
                or not _dense_layout(x, self._memory_format):
            return False
        head = self._head
        if (head is None) != (not head_modules) or \
                (head is not None and any(a is not b for a, b in zip(head_modules, head.modules()))):
            return False
        if (self._stem is None) != (stem is None) or (stem is not None and stem is not self._stem[0]):
            return False
        g = _module_globals
        if g._global_forward_hooks or g._global_forward_pre_hooks:
            return False
        if not self._watch.unchanged() or isa_env() != self._isa_env:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self._watch.requires_grad()):
            return False
        return not dispatcher_needed()

    @property
    def out_shapes(self) -> List[Tuple[int, int, int, int]]:
        """Every block's output shape, in order."""
        return [tuple(call.out_shape) for call in self._calls]

    def run(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The chain's output for `x` ([N, classes] for a plan with a head); None while another
        thread runs this plan."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            y = self._outputs.take()
            self._seq.run(x.data_ptr(), y.data_ptr(), torch.get_num_threads())
            return y
        finally:
            self._lock.release()

    def invalidate(self) -> None:
        self._valid = False
        self._seq = None  # (frees its work buffers)


def invalidate_all() -> None:
    """Drop every prepared chain's plan and buffers (lwkernels.clear_cache())."""
    for plan in list(_LIVE):
        plan.invalidate()
