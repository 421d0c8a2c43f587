"""JointBlock's eager CPU inference fast path: the fused call prepared once and replayed.

A network calls each block with the same input signature over and over, and with eval-mode
BatchNorm nothing the kernel reads changes between calls. Going through the op every time
(argument checks, BatchNorm folding, the packing cache, geometry, layout decisions) costs about
70 us of Python per call: 10-15% of a block whose kernel runs in half a millisecond. A PreparedCall
holds everything the C++ kernel needs — packed weights, geometry, the folded per-channel vectors,
the depthwise weights already multiplied by their scale (which the kernel would otherwise do before
every call) and their addresses — and is replayed while

  - the call is eager CPU inference that nothing else needs to see (no autograd recording, no
    compiler or tracer, no torch function/dispatch mode: ops.dispatcher_needed),
  - x (and the residual) have the shape, dtype and dense memory layout it was prepared for,
  - every submodule, parameter, buffer and setting the block reads is the same object as when it
    was prepared, and every tensor among them is at the same version (in-place updates such as an
    optimizer step or load_state_dict bump it),
  - LWKERNELS_CPU_ISA has not changed.

Anything else falls back to the op, which checks the arguments (raising its clear errors) and
prepares a new call. Writes through the legacy ``.data`` attribute bypass version counters, as for
the packing cache: call ``lwkernels.clear_cache()`` after them (it also drops prepared calls).
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch

from ..ops.contract import output_memory_format
from ..ops.activation import activation_name
from .call_signature import CallSignature
from .backend import NATIVE_DTYPES, PACK_CACHE, address, fold_depthwise, geometry_for, isa_env, native, selected_isa
from ..ops.inference import dispatcher_needed
from .outputs import new_output
from .state_watch import StateWatch

# What a JointBlock's fused eval forward reads, per submodule: (dict attribute, keys).
_MODULE_STATE = {
    "depthwise": (("_parameters", ("weight", "bias")),
                  ("__dict__", ("stride", "padding", "dilation", "padding_mode", "kernel_size"))),
    "pointwise": (("_parameters", ("weight", "bias")),),
    "bn": (("_parameters", ("weight", "bias")), ("_buffers", ("running_mean", "running_var")),
           ("__dict__", ("eps", "training", "track_running_stats"))),
    "mid_bn": (("_parameters", ("weight", "bias")), ("_buffers", ("running_mean", "running_var")),
               ("__dict__", ("eps", "training", "track_running_stats"))),
    "mid_act": (),
    "act": (),
}

#: Every live PreparedCall, so that clear_cache() can drop them all.
_LIVE: "weakref.WeakSet[PreparedCall]" = weakref.WeakSet()


def _dense_layout(t: torch.Tensor, memory_format: torch.memory_format) -> bool:
    """True when `t` is dense in `memory_format` and output_memory_format(t) would choose it."""
    if memory_format == torch.channels_last:
        return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return t.is_contiguous()


def _preparable(x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """Dense CPU float32/float64 inputs (anything else needs the op's conversions)."""
    if type(x) is not torch.Tensor or not x.is_cpu or x.dtype not in NATIVE_DTYPES or x.numel() == 0:
        return False
    memory_format = output_memory_format(x)
    if not _dense_layout(x, memory_format):
        return False
    return residual is None or (type(residual) is torch.Tensor and _dense_layout(residual, memory_format))


class PreparedCall(CallSignature):
    """One JointBlock's fused forward for one input signature; see the module docstring."""

    __slots__ = ("_watch", "_x_shape", "_dtype", "_memory_format",
                 "_has_residual", "_out_shape", "_isa_env", "_C", "_kernel", "_packed", "_geometry",
                 "_operands", "_addresses", "_folded", "_run_addresses", "_acts", "_valid", "__weakref__")

    @classmethod
    def prepare(cls, block: torch.nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor],
                folded: Tuple, out_shape: Tuple[int, int, int, int]) -> "Optional[PreparedCall]":
        """`block`'s fused call for `x` (and `residual`), whose arguments the op has just accepted
        (`folded` is block._folded_epilogues()); None when such a call cannot be replayed safely."""
        if not _preparable(x, residual):
            return None
        call = cls.__new__(cls)
        return call if call._init(block, x, residual, folded, out_shape) else None

    def _init(self, block, x, residual, folded, out_shape) -> bool:
        self._watch = StateWatch()
        for name, groups in _MODULE_STATE.items():
            if not self._watch.watch(block._modules, (name,)):
                return False
            module = block._modules.get(name)  # None (absent mid_bn) lives in __dict__
            if module is None:
                continue
            for attribute, keys in groups:
                if not self._watch.watch(getattr(module, attribute), keys):
                    return False
        dw, pw = block._modules["depthwise"], block._modules["pointwise"]
        self._x_shape = x.shape
        self._dtype = x.dtype
        self._memory_format = output_memory_format(x)
        self._has_residual = residual is not None
        self._out_shape = out_shape
        self._isa_env = isa_env()
        isa = selected_isa()
        layout = "nhwc" if self._memory_format == torch.channels_last else "nchw"
        _C = native()
        self._C = _C
        self._kernel = _C.joint_forward
        self._packed = PACK_CACHE.get(pw.weight, isa, layout)
        dw_weight = dw.weight.detach()
        self._geometry = geometry_for(_C, tuple(x.shape), out_shape, tuple(dw_weight.shape[2:]), tuple(dw.stride),
                                  tuple(dw.padding), tuple(dw.dilation), layout)
        # Keep the operands alive: the addresses below point into them.
        self._operands = (dw_weight.contiguous(),) + tuple(
            None if v is None else v.detach().contiguous() for v in folded)
        self._addresses = tuple(address(t) for t in self._operands)
        # run_into's depthwise operands, folded once for this layout (as CallSequence does).
        self._folded = fold_depthwise(_C, layout, *self._operands[:3])
        a = self._addresses
        self._run_addresses = (address(self._folded[0]), 0, address(self._folded[1]), a[3], a[4])
        self._acts = (activation_name(block._modules["mid_act"]), activation_name(block._modules["act"]))
        self._valid = True
        _LIVE.add(self)
        return True

    def matches(self, block: torch.nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
        """True when replaying gives exactly what the op would compute for this call."""
        if not self._valid or type(x) is not torch.Tensor or x.shape != self._x_shape or x.dtype != self._dtype \
                or not x.is_cpu or not _dense_layout(x, self._memory_format):
            return False
        if residual is None:
            if self._has_residual:
                return False
        elif not self._has_residual or type(residual) is not torch.Tensor or residual.shape != self._out_shape \
                or residual.dtype != self._dtype or not residual.is_cpu \
                or not _dense_layout(residual, self._memory_format):
            return False
        if not self.state_unchanged_here():  # (the ISA setting: below, once)
            return False
        if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)
                                        or self.parameters_require_grad()):
            return False
        if dispatcher_needed() or isa_env() != self._isa_env:
            return False
        return True

    def state_unchanged(self) -> bool:
        """True while every module, parameter, buffer and setting the block's call reads is the one
        it was prepared with, at the same version (the input checks are the caller's)."""
        return self._valid and self._watch.unchanged() and isa_env() == self._isa_env

    def state_unchanged_here(self) -> bool:
        """state_unchanged() without the ISA setting (for a caller that has just checked it)."""
        return self._valid and self._watch.unchanged()

    def parameters_require_grad(self) -> bool:
        return self._watch.requires_grad()

    def replay_state(self) -> Tuple[Tuple[StateWatch, ...], Optional[str]]:
        """What a caller that replays this call without matches() (cpu/prepared_sequence.py) checks
        instead, besides the input: the watches of what it read, and the instruction-set setting it
        was prepared under."""
        return (self._watch,), self._isa_env

    # What a call composed of this one (cpu/prepared_inverted_residual.py) reuses.
    @property
    def has_residual(self) -> bool:
        return self._has_residual

    @property
    def geometry(self):
        """The native JointGeometry."""
        return self._geometry

    @property
    def packed(self):
        """The packed pointwise weights."""
        return self._packed

    @property
    def addresses(self) -> Tuple[int, ...]:
        """Addresses of (dw_weight, dw_scale, dw_shift, pw_scale, pw_shift), 0 for absent ones: the
        operands as the op takes them, not folded (a composed call folds for its own layout)."""
        return self._addresses

    @property
    def depthwise_operands(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(dw_weight, dw_scale, dw_shift) as the op takes them (contiguous; the vectors may be None)."""
        return self._operands[:3]

    @property
    def activations(self) -> Tuple[str, str]:
        """(mid activation, output activation) names."""
        return self._acts

    def run(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        y = new_output(self._C, self._out_shape, self._dtype, self._memory_format)
        self.run_into(x, residual, y)
        return y

    def run_into(self, x: torch.Tensor, residual: Optional[torch.Tensor], y: torch.Tensor) -> None:
        """The fused call writing into `y`, which the caller has laid out as this call's output (shape,
        dtype, dense memory format) and which must not overlap x."""
        a = self._run_addresses
        # (y_sum, y_sumsq and dw_folded by position: pybind11's keyword matching took ~10 us of a
        # call whose caller the previous call's kernels left cold)
        self._kernel(self._packed, self._geometry, x.data_ptr(), a[0], a[1], a[2], self._acts[0], a[3], a[4],
                     address(residual), self._acts[1], y.data_ptr(), torch.get_num_threads(), 0, 0, True)

    def append_to(self, sequence, x: int, residual: int, y: int, transposed: bool = False) -> None:
        """Adds this call to a native CallSequence (cpu/prepared_sequence.py), reading slot x (and
        slot residual, or NO_SLOT) and writing slot y, with the operands run() passes; `transposed`
        (no residual): y in the other layout, the same values (writes_transposed_alike)."""
        a = self._addresses
        sequence.add_joint(self._packed, self._geometry, a[0], a[1], a[2], self._acts[0], a[3], a[4],
                           self._acts[1], x, residual, y, y_transposed=transposed)

    @property
    def writes_transposed_alike(self) -> bool:
        """True when append_to(transposed=True) gives exactly this call's values in the other
        layout: the kernels compute as before and transpose each tile's outputs as they store them."""
        return True

    def invalidate(self) -> None:
        self._valid = False


def invalidate_all() -> None:
    """Make every prepared call fall back to the op once (lwkernels.clear_cache())."""
    for call in list(_LIVE):
        call.invalidate()
