"""The op's CPU implementation: chooses the instruction-set path, packs pointwise weights once per
parameter version, lays tensors out densely and calls the C++ kernels in lwkernels._C."""
from __future__ import annotations

import os
import threading
import weakref
from typing import Dict, Optional, Tuple

import torch

from ..ops.args import JointArgs
from ..ops.contract import empty_output, output_memory_format
from .outputs import apply_cache_limit_from_env

#: Environment variable that forces a CPU path ("scalar", "avx2", "avx512", "neon"; "auto" or unset =
#: best).
ISA_ENV = "LWKERNELS_CPU_ISA"
CPU_PATHS = ("scalar", "avx2", "avx512", "neon")

#: Environment variable, read when the kernels are first loaded, that chooses how they run on
#: several threads: "auto" (default: on PyTorch's own OpenMP threads when its runtime is loaded, else
#: lwkernels' thread pool), "openmp" or "threadpool". See set_parallel_backend().
PARALLEL_ENV = "LWKERNELS_CPU_PARALLEL"
PARALLEL_BACKENDS = ("auto", "openmp", "threadpool")

# Kernels exist for these dtypes; half/bfloat16 on the CPU are computed in float32.
NATIVE_DTYPES = (torch.float32, torch.float64)


_NATIVE = None


def native():
    """The compiled kernels (lwkernels._C), with a clear error if the package was not built."""
    global _NATIVE
    if _NATIVE is not None:
        return _NATIVE
    try:
        from .. import _C
    except ImportError as e:  # pragma: no cover - only on a broken install
        raise RuntimeError(
            "lwkernels' C++ extension (lwkernels._C) is missing or failed to load; "
            "reinstall the package with `pip install .`"
        ) from e
    _apply_parallel_backend(_C, os.environ.get(PARALLEL_ENV, "auto"), f"{PARALLEL_ENV}=")
    apply_cache_limit_from_env(_C)
    _NATIVE = _C
    return _C


def _apply_parallel_backend(_C, name: str, what: str = "") -> None:
    requested = str(name).strip().lower() or "auto"
    if requested not in PARALLEL_BACKENDS:
        raise ValueError(f"{what}{name!r} is not a parallel backend; choose one of {PARALLEL_BACKENDS}")
    try:
        _C.set_parallel_backend(requested)
    except RuntimeError as e:
        raise RuntimeError(f"{what}{name!r}: {e}") from None


def set_parallel_backend(name: str) -> str:
    """Chooses where the CPU kernels run their threads, for the whole process; returns what they use now.

    "auto" (the default) and "openmp" run them on the team of the OpenMP runtime already loaded in
    the process (PyTorch's), so they never compete for cores with its idle threads, which keep
    spinning for a while after every PyTorch op; "openmp" raises if no such runtime is loaded.
    "threadpool" uses lwkernels' own threads. Either way the thread count is
    torch.get_num_threads()."""
    _C = native()
    _apply_parallel_backend(_C, name)
    return _C.parallel_backend_in_use()


def parallel_backend_in_use() -> str:
    """"openmp (<runtime library>)" or "threadpool": how the CPU kernels' next call runs its threads."""
    return native().parallel_backend_in_use()


def isa_env() -> Optional[str]:
    """LWKERNELS_CPU_ISA's value now (None when unset). Prepared calls compare it with the value they
    were made under on every call, after the kernels have evicted the interpreter's objects from the
    caches: read through the native module it costs ~4 us there, os.environ.get ~14 us."""
    return (_NATIVE or native()).environment_value(ISA_ENV)


# (raw LWKERNELS_CPU_ISA value, the path it selects): the last successful selection, so that the
# per-call lookup is one environment read and a comparison. Invalid values are never cached.
_ISA_CHOICE: Tuple[Optional[str], str] = (None, "")


def selected_isa() -> str:
    """The CPU path the next call will use (honours LWKERNELS_CPU_ISA)."""
    global _ISA_CHOICE
    raw = isa_env()
    choice = _ISA_CHOICE
    if choice[1] and choice[0] == raw:
        return choice[1]
    requested = (raw if raw is not None else "auto").strip().lower() or "auto"
    _C = native()
    if requested == "auto":
        isa = _C.best_isa()
    else:
        if requested not in CPU_PATHS:
            raise ValueError(f"{ISA_ENV}={requested!r} is not a CPU path; choose one of {CPU_PATHS} or 'auto'")
        if not _C.isa_supported(requested):
            raise RuntimeError(f"{ISA_ENV}={requested!r}: this build or this CPU does not support that path")
        isa = requested
    _ISA_CHOICE = (raw, isa)
    return isa


def pack_pointwise(weight: torch.Tensor, isa: str, layout: str):
    """The pointwise weight [C_out, C_in, 1, 1] packed into the micro-kernel's panels for one path
    and layout (uncached: PACK_CACHE.get caches it per weight version)."""
    _C = native()
    pack = _C.pack_pointwise_f32 if weight.dtype == torch.float32 else _C.pack_pointwise_f64
    w = weight.detach().reshape(weight.shape[0], weight.shape[1]).contiguous()
    return pack(isa, layout, w.data_ptr(), w.shape[0], w.shape[1], torch.get_num_threads())


class _PackCache:
    """Packed pointwise weights, one entry per weight tensor, valid while that tensor is alive and
    unchanged.

    An entry is found through the tensor's data address and checked against a weak reference to the
    tensor it was packed from and that tensor's version counter (shared with its views and
    detach()ed aliases), so an in-place update — optimizer step, load_state_dict, copy_ under
    no_grad — repacks, and memory reused by a new tensor never matches a dead entry. Writes through
    the legacy `.data` attribute bypass version counters; gradcheck perturbs inputs that way, so a
    call that autograd records drops its packing again (ops/inference_backward.py) — weights that require grad
    change every step anyway. Other `.data` writes need lwkernels.clear_cache().
    """

    def __init__(self) -> None:
        # Re-entrant: a weakref callback (garbage collection) may fire while this thread holds it.
        self._lock = threading.RLock()
        self._entries: Dict[Tuple, Tuple[weakref.ref, int, object]] = {}

    def get(self, weight: torch.Tensor, isa: str, layout: str):
        if weight.is_inference():  # inference tensors have no version counter: pack every call
            return pack_pointwise(weight, isa, layout)
        key = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), weight.dtype, isa, layout)
        version = weight._version
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                source, packed_version, packed = hit
                owner = source()
                if owner is not None and owner.data_ptr() == key[0] and packed_version == version:
                    return packed
        packed = pack_pointwise(weight, isa, layout)
        source = weakref.ref(weight, lambda _ref, k=key: self._drop(k, _ref))
        with self._lock:
            self._entries[key] = (source, version, packed)
        return packed


    def _drop(self, key: Tuple, ref: weakref.ref) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] is ref:
                del self._entries[key]

    def discard(self, weight: torch.Tensor) -> None:
        """Drop every packing of `weight` (all paths and layouts)."""
        try:
            ptr = weight.data_ptr()
        except RuntimeError:  # a fake/functional tensor while tracing: it has no packing
            return
        with self._lock:
            for key in [k for k in self._entries if k[0] == ptr]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


PACK_CACHE = _PackCache()


def address(t: Optional[torch.Tensor]) -> int:
    """A tensor's data address for the native layer (0 = absent)."""
    return 0 if t is None else t.data_ptr()


def fold_depthwise(_C, layout: str, weight: torch.Tensor, scale: Optional[torch.Tensor],
                   shift: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight times scale in the layout's order, shift) as the kernels read the depthwise operands,
    for a prepared call to fold once and pass with dw_folded=True instead of the kernel folding before
    every call. weight [C, 1, kh, kw] and the [C] vectors contiguous, in one native dtype."""
    channels, taps = weight.shape[0], weight.shape[2] * weight.shape[3]
    folded_weight = torch.empty(channels * taps, dtype=weight.dtype)
    folded_shift = torch.empty(channels, dtype=weight.dtype)
    fold = _C.fold_depthwise_f32 if weight.dtype == torch.float32 else _C.fold_depthwise_f64
    fold(layout, channels, taps, address(weight), address(scale), address(shift), address(folded_weight),
         address(folded_shift))
    return folded_weight, folded_shift


# JointGeometry objects by shape: a network calls each block with the same shapes every time, and
# building one from keyword arguments costs several microseconds. Geometries are immutable once
# cached (the kernel only reads them); the cache is bounded.
_GEOMETRIES: Dict[Tuple, object] = {}
_GEOMETRY_CACHE_SIZE = 256


def geometry_for(_C, x_shape, out_shape, kernel, stride, padding, dilation, layout: str):
    key = (x_shape, out_shape, kernel, stride, padding, dilation, layout)
    geometry = _GEOMETRIES.get(key)
    if geometry is None:
        n, c_in, h, w = x_shape
        geometry = _C.JointGeometry(
            batch=n, in_channels=c_in, in_h=h, in_w=w,
            out_channels=out_shape[1], out_h=out_shape[2], out_w=out_shape[3],
            kernel_h=kernel[0], kernel_w=kernel[1],
            stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1],
            dil_h=dilation[0], dil_w=dilation[1], layout=layout,
        )
        if len(_GEOMETRIES) >= _GEOMETRY_CACHE_SIZE:
            _GEOMETRIES.clear()
        _GEOMETRIES[key] = geometry
    return geometry


def computed_in_float32(kernel, args, out_shape):
    """kernel(args, out_shape) for half-precision args (no CPU kernel has them): every tensor in
    float32, the result rounded once at the end, in x's layout (.float() may re-lay a strided x)."""
    x = args.x
    f32 = type(args)(*(a.float() if isinstance(a, torch.Tensor) else a for a in args))
    return kernel(f32, out_shape).to(dtype=x.dtype, memory_format=output_memory_format(x))


def joint_block_cpu(args: JointArgs, out_shape: Tuple[int, int, int, int]) -> torch.Tensor:
    """The op on CPU tensors. `args` are already checked by contract.check_joint_args; `out_shape` is
    what it returned."""
    x = args.x
    if x.dtype not in NATIVE_DTYPES:
        return computed_in_float32(joint_block_cpu, args, out_shape)

    memory_format = output_memory_format(x)
    layout = "nhwc" if memory_format == torch.channels_last else "nchw"
    y = empty_output(x, out_shape)
    if y.numel() == 0:
        return y
    isa = selected_isa()
    packed = PACK_CACHE.get(args.pw_weight, isa, layout)

    x = x.contiguous(memory_format=memory_format)
    dw = args.dw_weight.contiguous()
    vectors = [None if v is None else v.contiguous() for v in (args.dw_scale, args.dw_shift, args.pw_scale,
                                                                 args.pw_shift)]
    residual = None if args.residual is None else args.residual.contiguous(memory_format=memory_format)
    _C = native()
    geometry = geometry_for(_C, tuple(x.shape), out_shape, tuple(dw.shape[2:]), tuple(args.stride),
                            tuple(args.padding), tuple(args.dilation), layout)
    _C.joint_forward(
        packed, geometry, address(x), address(dw), address(vectors[0]), address(vectors[1]), args.mid_act,
        address(vectors[2]), address(vectors[3]), address(residual), args.out_act, address(y),
        torch.get_num_threads(),
    )
    return y
