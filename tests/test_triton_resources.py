"""The fused kernel's compiled resources, checked without a GPU: every config autotuning may pick
(joint_block._candidate_configs) x dtype (fp16, bf16, fp32 with TF32 and full-precision dots) x
layout x epilogue (inference, training statistics), compiled for sm_90 with this machine's Triton,
must not spill registers and must allow at least 8 resident warps per SM. A spilling tile cannot
approach the kernel's roofline; benchmarks/resource_report.py writes the same numbers as a table.

About four minutes on two cores (the compilations run in two processes; Triton's cache makes reruns
fast). Skipped without Triton or its ahead-of-time API.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from lwkernels.triton import joint_block as kernels  # noqa: E402
from lwkernels.triton.offline import (ARCH_LIMITS, candidate_variants, measure_all, measure_variant,  # noqa: E402
                                      occupancy)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from resource_report import MIN_RESIDENT_WARPS, problems  # noqa: E402


def _needs_compiler():
    if kernels.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernel is an interpreted function")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ASTSource/GPUTarget ahead-of-time API")


def test_occupancy_rules():
    """The occupancy arithmetic on known sm_90 cases (CUDA occupancy calculator)."""
    assert occupancy(255, 4, 0) == (2, "registers")        # 255 -> 256 regs x 32 = 8192 per warp
    assert occupancy(128, 8, 17408) == (2, "registers")
    assert occupancy(64, 4, 0) == (8, "registers")         # 2048 registers per warp: 32 warps
    assert occupancy(24, 4, 0) == (16, "warps")             # 64 warps per SM at most
    assert occupancy(32, 1, 0) == (32, "blocks")
    assert occupancy(32, 4, 100 * 1024) == (2, "shared memory")
    assert occupancy(32, 4, ARCH_LIMITS[90]["smem_per_block"] + 1)[0] == 0


def test_detects_spills():
    """The measurement sees spills where they exist: 128 x 256 x 32 in fp16 NCHW on 4 warps holds a
    256-element fp32 accumulator per thread beside its depthwise tile, more than 255 registers."""
    _needs_compiler()
    from lwkernels.triton.offline import compile_joint_block, resources

    r = resources(compile_joint_block("fp16", 90, "tf32", (128, 256, 32, 1), channels_last=False, num_warps=4))
    assert r.spills and r.registers >= 250, r


@pytest.mark.slow
def test_no_candidate_spills_and_occupancy_holds():
    _needs_compiler()
    variants = candidate_variants()
    assert len(variants) == len(kernels._candidate_configs()) * 4 * 2 * 2
    rows = list(zip(variants, measure_all(variants, arch=90, jobs=2)))
    bad = problems(rows)
    assert not bad, (f"{len(bad)} of {len(rows)} variants break the rule (no spills, >= {MIN_RESIDENT_WARPS} "
                     "resident warps per SM):\n" + "\n".join(bad))


def test_measure_variant_matches_the_candidates_warps():
    _needs_compiler()
    v = candidate_variants(dtypes=("fp16",), stats=(False,))[0]
    r = measure_variant(v)
    assert r.num_warps == kernels.tile_config(*v.tile).num_warps
    assert r.registers > 0 and r.shared_bytes > 0
