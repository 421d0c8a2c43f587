"""Static resource report of the fused Triton kernel, no GPU needed.

For every autotune candidate (lwkernels.triton.joint_block._candidate_configs) x dtype (fp16, bf16,
fp32 with TF32 dots, fp32 with full-precision dots) x layout (NCHW, channels_last) x epilogue
(inference, training statistics), compile the kernel for sm_<arch> with this machine's Triton and
record registers per thread, spills (stack bytes, local loads/stores), shared memory per block and
the occupancy they allow (resident warps per SM). Writes a Markdown table to benchmarks/results/
(resources-sm<arch>-triton<version>.md) and prints the summary.

    python benchmarks/resource_report.py                 # sm_90, every variant, 2 worker processes
    python benchmarks/resource_report.py --jobs 4 --arch 80

The specialisation is that of tests/test_triton_gpu.py's offline test (32 -> 64 channels, 56 x 56,
3x3 dilation 3, every epilogue option on, aligned pointers), indexing in int32 as every tensor below
2^31 elements does. Exit status 1 when some variant spills or allows fewer than MIN_RESIDENT_WARPS.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import List, Sequence, Tuple

try:
    import lwkernels  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the tree this file is in
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lwkernels.triton.offline import (ARCH_LIMITS, DTYPE_VARIANTS, Resources, Variant,  # noqa: E402
                                      candidate_variants, measure_all)

RESULTS = Path(__file__).resolve().parent / "results"
#: The occupancy every candidate must allow (warps resident per SM).
MIN_RESIDENT_WARPS = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, choices=sorted(ARCH_LIMITS), default=90, help="compute capability x 10")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPE_VARIANTS), default=list(DTYPE_VARIANTS))
    p.add_argument("--jobs", type=int, default=2, help="compiler worker processes")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the Markdown table")
    return p.parse_args(argv)


def problems(rows: Sequence[Tuple[Variant, Resources]]) -> List[str]:
    """One line per variant that spills or allows fewer than MIN_RESIDENT_WARPS warps per SM."""
    out = []
    for v, r in rows:
        if r.spills:
            out.append(f"{_name(v)}: spills ({r.stack_bytes} B stack, {r.spill_instructions} local loads/stores)")
        if r.resident_warps < MIN_RESIDENT_WARPS:
            out.append(f"{_name(v)}: {r.resident_warps} resident warps per SM (limited by {r.limited_by})")
    return out


def _name(v: Variant) -> str:
    p, co, ci, st = v.tile
    return f"{p}x{co}x{ci} s{st} {v.dtype} {v.layout}{' stats' if v.stats else ''}"


def markdown(rows: Sequence[Tuple[Variant, Resources]], arch: int, triton_version: str, seconds: float) -> str:
    spilling = sum(r.spills for _, r in rows)
    warps = [r.resident_warps for _, r in rows]
    lines = [
        f"# Fused kernel resources on sm_{arch}, Triton {triton_version}",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; compiled offline (no GPU) by "
        "benchmarks/resource_report.py in "
        f"{seconds:.0f} s. Specialisation: 32 -> 64 channels, 56 x 56, 3x3 dilation 3, every epilogue option, "
        "int32 indexing. Registers and stack from the cubin, spills = local loads/stores in the SASS, shared = "
        "Triton's dynamic buffers + static; occupancy by the CUDA rules (registers in 256-per-warp units, "
        "1 KiB shared reserved per block).",
        "",
        f"**{len(rows)} variants: {spilling} spill; resident warps per SM {min(warps)}-{max(warps)} "
        f"(at least {MIN_RESIDENT_WARPS} required).**",
        "",
        "| tile P x CO x CI | stages | warps | dtype | layout | epilogue | regs/thread | stack B | spill ld/st | "
        "shared B | blocks/SM | warps/SM | limited by |",
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for v, r in rows:
        p, co, ci, st = v.tile
        lines.append(f"| {p} x {co} x {ci} | {st} | {r.num_warps} | {v.dtype} | {v.layout} | "
                     f"{'training stats' if v.stats else 'inference'} | {r.registers} | {r.stack_bytes} | "
                     f"{r.spill_instructions} | {r.shared_bytes} | {r.blocks_per_sm} | {r.resident_warps} | "
                     f"{r.limited_by} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton

    variants = candidate_variants(dtypes=tuple(args.dtypes))
    print(f"compiling {len(variants)} variants for sm_{args.arch} with Triton {triton.__version__} "
          f"({args.jobs} processes)...", flush=True)
    start = time.time()
    rows = list(zip(variants, measure_all(variants, args.arch, args.jobs)))
    seconds = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"resources-sm{args.arch}-triton{triton.__version__}.md"
    path.write_text(markdown(rows, args.arch, triton.__version__, seconds))
    bad = problems(rows)
    print(f"{len(rows)} variants in {seconds:.0f} s: {sum(r.spills for _, r in rows)} spill, resident warps per SM "
          f"{min(r.resident_warps for _, r in rows)}-{max(r.resident_warps for _, r in rows)}; wrote {path}")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
