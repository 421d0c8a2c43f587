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

Every block runs in the caller's memory format, so the output is laid out as the blocks called in
turn would lay it out. (Running the wide blocks channels-last, which is faster per block from about
64 input channels on, did not pay: converting the 64x112x112 LightweightNet activation cost more
than the later blocks gained; docs/performance.md.)

The plan is replayed while
  - the chain holds the same JointBlock objects (plain JointBlock.forward, no forward hooks on them
    and no global forward hooks: the replay does not call them),
  - every block's prepared call still matches its block (same modules, parameters at the same
    version, same settings: the calls' state watches, checked together in one pass; the same
    instruction-set choice),
  - x has the signature it was prepared for, nothing needs autograd (no grad, or nothing requires
    it), and nothing needs to see the ops (ops.inference.dispatcher_needed),
  - no other thread is running the same plan (the buffers are the plan's; a concurrent caller goes
    block by block instead).
Anything else runs the blocks one by one, each with its own checks and errors.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import List, Optional, Tuple

import torch
from torch.nn.modules import module as _module_globals

from ..ops.contract import output_memory_format
from ..ops.inference import dispatcher_needed
from ..nn.folding import uses_running_stats
from .backend import ISA_ENV, native
from .outputs import new_output
from .prepared_call import PreparedCall, _dense_layout
from .state_watch import StateWatch

#: Every live PreparedChain, so that lwkernels.clear_cache() can drop them (and their buffers).
_LIVE: "weakref.WeakSet[PreparedChain]" = weakref.WeakSet()


def _view(flat: torch.Tensor, shape: Tuple[int, int, int, int], memory_format) -> torch.Tensor:
    """A tensor of `shape`, dense in `memory_format`, at the start of the buffer `flat`."""
    n, c, h, w = shape
    head = flat[: n * c * h * w]
    if memory_format == torch.channels_last:
        return head.view(n, h, w, c).permute(0, 3, 1, 2)
    return head.view(n, c, h, w)


def _no_hooks(blocks) -> bool:
    g = _module_globals
    if g._global_forward_hooks or g._global_forward_pre_hooks:
        return False
    return not any(b._forward_hooks or b._forward_pre_hooks for b in blocks)


class PreparedChain:
    """The fused calls of one chain of JointBlocks for one input signature; see the module docstring."""

    __slots__ = ("_blocks", "_calls", "_sequence", "_x_shape", "_dtype", "_memory_format", "_lock",
                 "_watch", "_isa_env", "_valid", "__weakref__")

    @classmethod
    def prepare(cls, blocks: List[torch.nn.Module], x: torch.Tensor,
                out_shapes: List[Tuple[int, int, int, int]]) -> "Optional[PreparedChain]":
        """The plan for `blocks` called in turn on `x`, right after they have been, giving outputs
        of `out_shapes`; None when the calls cannot be replayed safely. Each block must have taken
        its fused eval path just now: its own prepared call (block.py) exists and still matches."""
        if not blocks or type(x) is not torch.Tensor:
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
        return plan if plan._init(blocks, x, out_shapes, memory_format) else None

    def _init(self, blocks, x, out_shapes, memory_format) -> bool:
        self._blocks = tuple(blocks)
        self._x_shape, self._dtype, self._memory_format = x.shape, x.dtype, memory_format
        # Block i writes buffer i % 2 (the last one a fresh output), as in the sequence below; prepare
        # each call on views laid out as those it will read and write, so that its layout checks see
        # what the replay does.
        numel = max([s[0] * s[1] * s[2] * s[3] for s in out_shapes[:-1]] + [1])
        buffers = tuple(torch.empty(numel, dtype=x.dtype) for _ in range(2))
        outputs = tuple(_view(buffers[i % 2], s, memory_format) for i, s in enumerate(out_shapes[:-1]))
        self._calls: List[PreparedCall] = []
        for block, source, out_shape in zip(blocks, (x,) + outputs, out_shapes):
            call = PreparedCall.prepare(block, source, None, block._folded_epilogues(), out_shape)
            if call is None or call.memory_format != memory_format:
                return False
            self._calls.append(call)
        # The same calls, bound in order: input -> work buffers, alternately -> output.
        _C = native()
        seq = (_C.CallSequence_f32 if x.dtype == torch.float32 else _C.CallSequence_f64)()
        src = seq.INPUT
        for i, call in enumerate(self._calls):
            dst = seq.OUTPUT if i == len(self._calls) - 1 else (seq.WORK_B if src == seq.WORK_A else seq.WORK_A)
            call.append_to(seq, src, seq.NO_SLOT, dst)
            src = dst
        self._sequence = seq
        # What every call read, checked in one pass per chain call (not one per block).
        states = [call.replay_state() for call in self._calls]
        self._isa_env = states[0][1]
        if any(isa_env != self._isa_env for _, isa_env in states):
            return False
        self._watch = StateWatch.union(w for watches, _ in states for w in watches)
        self._lock = threading.Lock()
        self._valid = True
        _LIVE.add(self)
        return True

    def matches(self, blocks, x: torch.Tensor) -> bool:
        """True when replaying gives exactly what calling the blocks in turn would."""
        if not self._valid or type(x) is not torch.Tensor or x.shape != self._x_shape or x.dtype != self._dtype \
                or not x.is_cpu or not _dense_layout(x, self._memory_format):
            return False
        if len(blocks) != len(self._blocks) or any(a is not b for a, b in zip(blocks, self._blocks)):
            return False
        if not _no_hooks(self._blocks):
            return False
        if not self._watch.unchanged() or os.environ.get(ISA_ENV) != self._isa_env \
                or not all(call.valid for call in self._calls):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(c.parameters_require_grad() for c in self._calls)):
            return False
        return not dispatcher_needed()

    def run(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The chain's output for `x`; None while another thread runs this plan."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            last = self._calls[-1]
            y = new_output(native(), last.out_shape, self._dtype, self._memory_format)
            self._sequence.run(x.data_ptr(), y.data_ptr(), torch.get_num_threads())
            return y
        finally:
            self._lock.release()

    def invalidate(self) -> None:
        self._valid = False
        self._sequence = None  # (frees its work buffers)


def invalidate_all() -> None:
    """Drop every prepared chain's plan and buffers (lwkernels.clear_cache())."""
    for plan in list(_LIVE):
        plan.invalidate()
