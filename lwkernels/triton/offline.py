"""The fused kernel compiled ahead of time for a GPU architecture on a machine without a GPU, and the
resources its compiled code needs: registers per thread, spills, shared memory, and the occupancy
(resident warps per SM) they allow.

Triton compiles through its own bundled ptxas, so none of this needs a driver or a device. The
resource figures are read from the cubin with the cuobjdump Triton bundles (registers and the
local-memory stack frame) and from its SASS (local loads and stores: spills, since the kernels keep
no arrays in local memory). The occupancy follows the CUDA occupancy rules with the limits of the
architecture (ARCH_LIMITS).

APIs relied on (present in Triton 3.6 and 3.9): triton.compile(ASTSource(fn, signature,
constexprs=..., attrs=...), target=GPUTarget("cuda", arch, 32), options={"num_warps", "num_stages"});
the compiled kernel's .asm["ptx"] / .asm["cubin"] and .metadata.shared; the JITFunction's .arg_names.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

#: Per-SM limits (CUDA occupancy calculator): register file, register allocation unit per warp,
#: most warps and blocks resident, shared memory per SM and per block, shared memory the driver
#: reserves per block.
ARCH_LIMITS: Dict[int, Dict[str, int]] = {
    80: dict(regs=65536, reg_unit=256, max_regs_per_thread=255, warps=64, blocks=32, smem=164 * 1024,
             smem_per_block=163 * 1024, smem_reserved=1024),
    90: dict(regs=65536, reg_unit=256, max_regs_per_thread=255, warps=64, blocks=32, smem=228 * 1024,
             smem_per_block=227 * 1024, smem_reserved=1024),
}

#: The x / y element type of each report "dtype", and the dot's input precision there. fp32 runs
#: TF32 dots when PyTorch allows TF32 convolutions (its default), full-precision FMAs otherwise.
DTYPE_VARIANTS: Dict[str, Tuple[str, str]] = {
    "fp16": ("fp16", "tf32"), "bf16": ("bf16", "tf32"), "fp32-tf32": ("fp32", "tf32"), "fp32-ieee": ("fp32", "ieee"),
}

_STATS_POINTERS = ("sum_ptr", "m2_ptr", "cnt_ptr")


def aot_signature(fn, values: dict, constexprs: dict, pointer_type: Callable[[str], str],
                  divisibility: bool = False):
    """The ahead-of-time (triton.compile) signature of kernel `fn`, specialised as Triton's launcher
    would: pointers typed by `pointer_type(name)`, integer arguments equal to 1 become constexpr,
    the others i32; with `divisibility`, pointers and multiples of 16 get the 16-divisibility hint.
    Returns (signature, constexprs, attrs); `constexprs` is extended in place."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name.endswith("_ptr"):
            signature[name] = pointer_type(name)
            if divisibility:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in constexprs:
            signature[name] = "constexpr"
        elif values[name] == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if divisibility and values[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_joint_block(dtype: str, arch: int, dot_precision: str, tile: Tuple[int, int, int, int],
                        channels_last: bool, stats: bool = False, kernel_size: int = 3,
                        num_warps: Optional[int] = None, index_64: bool = False):
    """Compile the fused kernel for sm_<arch> without a GPU, specialised the way a runtime call
    would be: 32 -> 64 channels, 56 x 56, kernel_size x kernel_size dilation 3 padding 3, aligned
    pointers, ints divisible by 16 marked so and ints equal to 1 folded to constants, every
    epilogue option on (depthwise and pointwise affine, ReLU, residual, ReLU6; the statistics
    epilogue when `stats`), indexing in int32 unless `index_64`. `dtype`: "fp16", "bf16" or "fp32"; tile: (BLOCK_P, BLOCK_CO, BLOCK_CI,
    num_stages); num_warps defaults to what tile_config gives the tile. Returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import joint_block as kernels

    if dtype not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"dtype must be fp16, bf16 or fp32, got {dtype!r}")
    if arch not in ARCH_LIMITS:
        raise ValueError(f"arch must be one of {sorted(ARCH_LIMITS)}, got {arch!r}")
    fn = kernels._joint_block_kernel
    c_in, c_out, hw, n = 32, 64, 56, 128
    k2 = kernel_size * kernel_size
    values = dict(M=n * hw * hw, OHW=hw * hw, C_IN=c_in, C_OUT=c_out, H=hw, W=hw, OW=hw, sdc=k2,
                  sdh=kernel_size, sdw=1, spo=c_in, spc=1, srn=0, src=0, srh=0, srw=0, STRIDE_H=1, STRIDE_W=1,
                  PAD_H=3, PAD_W=3, DIL_H=3, DIL_W=3, M_BUCKET=1 << 19)
    if channels_last:
        values.update(sxn=hw * hw * c_in, sxc=1, sxh=hw * c_in, sxw=c_in, syn=hw * hw * c_out, syc=1,
                      syh=hw * c_out, syw=c_out)
    else:
        values.update(sxn=hw * hw * c_in, sxc=hw * hw, sxh=hw, sxw=1, syn=hw * hw * c_out, syc=hw * hw,
                      syh=hw, syw=1)
    block_p, block_co, block_ci, stages = tile
    constexprs = dict(KH=kernel_size, KW=kernel_size, HAS_DW_SCALE=True, HAS_DW_SHIFT=True, MID_ACT=1,
                      HAS_PW_SCALE=True, HAS_PW_SHIFT=True, HAS_RESIDUAL=True, OUT_ACT=2,
                      DOT_PRECISION=dot_precision, HAS_STATS=stats, CHANNELS_LAST=channels_last, INDEX_64=index_64,
                      BLOCK_P=block_p, BLOCK_CO=block_co, BLOCK_CI=block_ci)
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature, constexprs, attrs = aot_signature(
        fn, values, constexprs, lambda name: "*fp32" if name in _STATS_POINTERS else "*" + dtype, divisibility=True)
    if num_warps is None:
        num_warps = kernels.tile_config(*tile).num_warps
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": stages})


@dataclass(frozen=True)
class Resources:
    """What one compiled kernel needs per thread and per block, and the occupancy that allows."""
    registers: int          # per thread
    stack_bytes: int        # local-memory stack frame per thread (0 unless registers spill)
    spill_instructions: int  # local loads + stores in the SASS
    shared_bytes: int       # per block: dynamic (Triton's buffers) + static
    num_warps: int
    blocks_per_sm: int
    resident_warps: int     # per SM
    limited_by: str         # "registers", "shared memory", "warps" or "blocks"

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.spill_instructions > 0

    def as_dict(self) -> Dict:
        return {**asdict(self), "spills": self.spills}


def occupancy(registers: int, num_warps: int, shared_bytes: int, arch: int = 90) -> Tuple[int, str]:
    """(blocks resident per SM, the limit that binds) for a kernel with these per-thread registers,
    warps per block and shared bytes per block on sm_<arch>."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // lim["reg_unit"]) * lim["reg_unit"]
    limits = {
        "registers": lim["regs"] // (regs_per_warp * num_warps),
        "shared memory": (lim["smem"] // (shared_bytes + lim["smem_reserved"])
                          if shared_bytes <= lim["smem_per_block"] else 0),
        "warps": lim["warps"] // num_warps,
        "blocks": lim["blocks"],
    }
    binding = min(limits, key=lambda k: limits[k])
    return limits[binding], binding


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Triton's bundled {name} is not at {path}")
    return path


def resources(compiled, arch: int = 90) -> Resources:
    """Registers, spills, shared memory and occupancy of a kernel compiled by triton.compile."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump printed no register count:\n{usage}")
    spill_instructions = len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\s", sass))
    shared = int(compiled.metadata.shared) + int(fields.get("SHARED", 0))
    num_warps = int(compiled.metadata.num_warps)
    registers = int(fields["REG"])
    blocks, binding = occupancy(registers, num_warps, shared, arch)
    return Resources(registers=registers, stack_bytes=int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
                     spill_instructions=spill_instructions, shared_bytes=shared, num_warps=num_warps,
                     blocks_per_sm=blocks, resident_warps=blocks * num_warps, limited_by=binding)


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation of the fused kernel: a candidate tile, dtype, layout, epilogue."""
    tile: Tuple[int, int, int, int]  # (BLOCK_P, BLOCK_CO, BLOCK_CI, num_stages)
    dtype: str                       # a DTYPE_VARIANTS key
    channels_last: bool
    stats: bool                      # the training statistics epilogue

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "NCHW"


def candidate_variants(dtypes=tuple(DTYPE_VARIANTS), stats=(False, True)) -> List[Variant]:
    """Every autotune candidate (joint_block._candidate_configs) x dtype x layout x epilogue."""
    from . import joint_block as kernels

    tiles = [(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_CO"], c.kwargs["BLOCK_CI"], c.num_stages)
             for c in kernels._candidate_configs()]
    return [Variant(tile, dtype, cl, st) for tile in tiles for dtype in dtypes for cl in (False, True)
            for st in stats]


def measure_variant(variant: Variant, arch: int = 90) -> Resources:
    """Compile one variant for sm_<arch> and read its resources."""
    dtype, precision = DTYPE_VARIANTS[variant.dtype]
    return resources(compile_joint_block(dtype, arch, precision, variant.tile, variant.channels_last,
                                         stats=variant.stats), arch)


def _measure(args):
    return measure_variant(*args)


def measure_all(variants: Sequence[Variant], arch: int = 90, jobs: int = 1) -> List[Resources]:
    """measure_variant for each variant, in `jobs` worker processes (compilation is CPU-bound).
    Workers are spawned, not forked: the caller may already run PyTorch's threads."""
    if jobs <= 1:
        return [measure_variant(v, arch) for v in variants]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_measure, [(v, arch) for v in variants]))
