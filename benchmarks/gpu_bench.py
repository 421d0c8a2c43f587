"""CUDA microbenchmarks with the roofline view, in one process, against a deadline.

The nine blocks of lwkernels.models.shapes.BENCHMARK_BLOCKS and their chain (the nine in sequence:
each block's output is the next one's input) at batch 128, in fp16, bf16 and fp32 (TF32 as PyTorch's
conv setting says), for the providers eager (cuDNN, NCHW), eager_channels_last, compile
(torch.compile, default mode), lwkernels (NCHW) and lwkernels_channels_last. Each row has the time,
GB/s, TFLOP/s and the percentage of the roofline bound (benchmarks/roofline.py: copy bandwidth and
matmul rate measured in the same run).

Before timing, the Triton kernels every autotuning will try are compiled in parallel worker processes
(Triton's on-disk cache is shared), so autotuning then only times them. Measurements are ordered by
importance (fp16 first, the channels_last providers first) and stop at the deadline: what was not
measured is listed as skipped. Writes one JSON file.

    python benchmarks/gpu_bench.py --json bench.json [--deadline 150] [--dtypes fp16] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import lwkernels  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the tree this file is in
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: Provider order within a shape: what the targets compare first.
PROVIDERS = ("eager_channels_last", "lwkernels_channels_last", "eager", "lwkernels", "compile")
CHAIN = "chain (nine blocks)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, help="output file")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--no-compile", action="store_true", help="leave the torch.compile provider out")
    p.add_argument("--no-chain", action="store_true", help="leave the chain out")
    p.add_argument("--deadline", type=float, default=150.0, help="seconds; later measurements are skipped")
    p.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time per measurement (ms)")
    p.add_argument("--warm-jobs", type=int, default=12, help="processes compiling the Triton candidates (0: none)")
    p.add_argument("--warm-only", action="store_true",
                   help="only compile the candidates into Triton's cache (for a later run to time them)")
    p.add_argument("--warm-train-dtype", choices=list(DTYPES),
                   help="also compile the training step's kernels (gpu_train_step.py) for this dtype")
    return p.parse_args(argv)


def _warm_one(job):
    """In a worker: launch the kernel once per candidate tile for one (shape, dtype, layout), which
    compiles it into Triton's on-disk cache with the specialisation the autotuned call will use; for
    a training job, run one training step of the block (autotuning the statistics kernel, compiling
    the depthwise statistics and backward kernels) as gpu_train_step.py's chain will."""
    shape_index, dtype_name, channels_last, batch, train = job
    from lwkernels.bench.harness import make_block, make_input
    from lwkernels.bench.training import make_train_step
    from lwkernels.models.shapes import BENCHMARK_BLOCKS
    from lwkernels.ops.activation import activation_name
    from lwkernels.triton.backend import uses_tf32
    from lwkernels.triton.joint_block import joint_block_triton, select_configs, tile_config

    shape = BENCHMARK_BLOCKS[shape_index]
    dtype = DTYPES[dtype_name]
    block = make_block(shape, dtype, "cuda")
    x = make_input(shape, batch, dtype, "cuda")
    if train:
        make_train_step("lwkernels_channels_last" if channels_last else "lwkernels", block, x)()
        return 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dw, pw = block.depthwise, block.pointwise
    with torch.no_grad():  # the arguments JointBlock.forward passes, so the specialisation matches
        folded = block._folded_epilogues(dw, pw, block.bn, block.mid_bn)
    args = [x, dw.weight, folded[0], folded[1], activation_name(block.mid_act), pw.weight, folded[2], folded[3],
            None, activation_name(block.act), list(dw.stride), list(dw.padding), list(dw.dilation)]
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    done = 0
    with torch.no_grad():
        for tile in select_configs(shape.in_channels, shape.out_channels):
            joint_block_triton(*args, allow_tf32=uses_tf32(x), config=tile_config(*tile).all_kwargs())
            done += 1
    torch.cuda.synchronize()
    return done


def warm_triton_cache(dtypes, layouts, batch: int, jobs: int, train_dtype=None) -> Dict:
    """Compile, in `jobs` processes, every candidate tile of each shape x dtype x layout (True:
    channels_last) into Triton's on-disk cache, and the training step's kernels in train_dtype
    (same layouts)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from lwkernels.models.shapes import BENCHMARK_BLOCKS

    blocks = range(len(BENCHMARK_BLOCKS))
    work = [(i, d, cl, batch, False) for d in dtypes for cl in layouts for i in blocks]
    if train_dtype is not None:  # first: each is a whole training step, the longest jobs
        work = [(i, train_dtype, cl, batch, True) for cl in layouts for i in blocks] + work
    start = time.time()
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        kernels = sum(pool.map(_warm_one, work))
    return {"kernels": kernels, "seconds": time.time() - start}


def chain_of(dtype):
    from torch import nn

    from lwkernels.bench.harness import make_block
    from lwkernels.models.shapes import BENCHMARK_BLOCKS

    return nn.Sequential(*(make_block(s, dtype, "cuda", seed=k) for k, s in enumerate(BENCHMARK_BLOCKS)))


def _setup(cache: Dict, shape, dtype_name: str, batch: int, bandwidth: float, rates: Dict) -> Dict:
    """The module, input, reference twin and roofline bound of one shape and dtype; the last one is
    kept (measurements of one shape follow each other), earlier ones are freed."""
    from lwkernels.bench.harness import make_block, make_input
    from lwkernels.models.shapes import BENCHMARK_BLOCKS
    from lwkernels.nn.fuse import to_reference

    key = (getattr(shape, "name", shape), dtype_name)
    if key in cache:
        return cache[key]
    cache.clear()
    torch.cuda.empty_cache()
    dtype = DTYPES[dtype_name]
    itemsize = torch.finfo(dtype).bits // 8
    blocks = list(BENCHMARK_BLOCKS) if shape == CHAIN else [shape]
    module = chain_of(dtype) if shape == CHAIN else make_block(shape, dtype, "cuda")
    setup = {
        "name": key[0], "module": module, "reference": to_reference(module),
        "x": make_input(blocks[0], batch, dtype, "cuda"),
        "flops": sum(s.flops(batch) for s in blocks),
        "bytes": sum(s.bytes_moved(batch, itemsize) for s in blocks),
        # the chain's bound is the sum of its blocks' bounds (each block is memory- or compute-bound)
        "bound_s": sum(max(s.bytes_moved(batch, itemsize) / bandwidth, s.flops(batch) / rates[dtype_name])
                       for s in blocks),
    }
    cache[key] = setup
    return setup


def _speedups(rows: List[Dict]) -> None:
    """Each row's speedup over eager channels_last and over torch.compile of the same shape and dtype."""
    times = {(r["shape"], r["dtype"], r["provider"]): r["time_ms"] for r in rows if "time_ms" in r}
    for r in rows:
        for base in ("eager_channels_last", "compile"):
            t = times.get((r["shape"], r["dtype"], base))
            if "time_ms" in r and t:
                r[f"speedup_vs_{base}"] = t / r["time_ms"]


def _providers(args) -> List[str]:
    return [p for p in args.providers if not (p == "compile" and args.no_compile)]


def _warm(args):
    layouts = [p == "lwkernels_channels_last" for p in _providers(args) if p.startswith("lwkernels")]
    if args.warm_jobs <= 0 or not (layouts or args.warm_train_dtype):
        return None
    return warm_triton_cache(args.dtypes, layouts, args.batch, args.warm_jobs, args.warm_train_dtype)


def measure(args) -> Dict:
    import roofline
    from lwkernels.bench.harness import make_provider
    from lwkernels.models.shapes import BENCHMARK_BLOCKS
    from lwkernels.triton.backend import cudnn_conv_uses_tf32, register_cuda_kernel

    start = time.time()
    if not register_cuda_kernel():
        raise SystemExit("gpu_bench.py: Triton is not importable, so lwkernels has no CUDA kernel to measure")
    env = roofline.environment()
    tf32 = cudnn_conv_uses_tf32()
    bandwidth = roofline.copy_bandwidth(args.rep_ms)
    rates = {name: roofline.matmul_rate(DTYPES[name], args.rep_ms, tf32) for name in args.dtypes}
    providers = _providers(args)
    warm = _warm(args)
    shapes = list(BENCHMARK_BLOCKS) + ([] if args.no_chain else [CHAIN])

    # What to measure, most important first: every dtype and shape without torch.compile, then
    # torch.compile (seconds of compilation each), the chain first.
    plain = [p for p in providers if p != "compile"]
    order = [(d, shape, p) for d in args.dtypes for shape in shapes for p in plain]
    if "compile" in providers:
        order += [(d, shape, "compile") for d in args.dtypes for shape in shapes[::-1]]
    rows: List[Dict] = []
    skipped: List[str] = []
    cache: Dict = {}
    for dtype_name, shape, provider in order:
        label = f"{getattr(shape, 'name', shape)} {dtype_name} {provider}"
        if time.time() - start > args.deadline:
            skipped.append(label)
            continue
        setup = _setup(cache, shape, dtype_name, args.batch, bandwidth, rates)
        try:
            run = make_provider(provider, setup["module"], setup["x"], setup["reference"],
                                compile_mode="default" if provider == "compile" else None)
            run()  # compilation, autotuning, algorithm choice outside the measurement
            seconds = roofline.bench_ms(run, args.rep_ms) * 1e-3
        except Exception as e:  # one failing provider must not stop the others
            rows.append({"shape": setup["name"], "dtype": dtype_name, "provider": provider,
                         "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"{label}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        finally:
            run = None
        rows.append({"shape": setup["name"], "dtype": dtype_name, "batch": args.batch, "provider": provider,
                     "time_ms": seconds * 1e3, "gbytes_per_s": setup["bytes"] / seconds / 1e9,
                     "tflops": setup["flops"] / seconds / 1e12, "bound_ms": setup["bound_s"] * 1e3,
                     "roofline_pct": 100 * setup["bound_s"] / seconds})
        print(f"{label}: {seconds * 1e3:.3f} ms, {rows[-1]['roofline_pct']:.1f}% of bound", flush=True)
    _speedups(rows)
    return {"environment": env, "copy_bandwidth_gbytes_per_s": bandwidth / 1e9,
            "matmul_tflops": {k: v / 1e12 for k, v in rates.items()}, "triton_warmup": warm,
            "rows": rows, "skipped": skipped, "seconds": time.time() - start}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench.py needs a CUDA GPU: torch.cuda.is_available() is False here; nothing was measured.",
              file=sys.stderr)
        return 2
    result = {"triton_warmup": _warm(args)} if args.warm_only else measure(args)
    if args.warm_only:
        print(f"compiled the Triton candidates: {result['triton_warmup']}")
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json} ({len(result['rows'])} rows, {len(result['skipped'])} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
