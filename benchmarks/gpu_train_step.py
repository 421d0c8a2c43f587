"""One training step (forward + backward, batch statistics) of the nine-block chain on a CUDA device:
lwkernels (the fused training op: Triton forward with statistics, Triton depthwise backward) against
eager PyTorch, NCHW and channels_last, at batch 128 in fp16, with the peak memory of a step.

    python benchmarks/gpu_train_step.py --json train.json [--batch 128] [--dtype fp16] [--deadline 60]

Times are do_bench medians; peak memory is torch.cuda.max_memory_allocated over one step after a
reset, minus what was allocated before it (parameters, input, gradient buffers of the previous step
freed). Writes one JSON file.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import lwkernels  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the tree this file is in
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROVIDERS = ("eager_channels_last", "lwkernels_channels_last", "eager", "lwkernels")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds; later providers are skipped")
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_train_step.py needs a CUDA GPU: torch.cuda.is_available() is False here.", file=sys.stderr)
        return 2
    from gpu_bench import chain_of
    from roofline import bench_ms
    from lwkernels.bench.harness import make_input
    from lwkernels.bench.training import make_train_step
    from lwkernels.models.shapes import BENCHMARK_BLOCKS
    from lwkernels.triton.backend import register_cuda_kernel

    start = time.time()
    register_cuda_kernel()
    dtype = DTYPES[args.dtype]
    rows, skipped = [], []
    for provider in args.providers:
        if time.time() - start > args.deadline:
            skipped.append(provider)
            continue
        try:
            chain = chain_of(dtype)  # make_train_step runs its plain-PyTorch twin for the eager providers
            x = make_input(BENCHMARK_BLOCKS[0], args.batch, dtype, "cuda")
            step = make_train_step(provider, chain, x)
            step()  # autotuning, cuDNN algorithm choice
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            peak = torch.cuda.max_memory_allocated() - base
            ms = bench_ms(step, args.rep_ms)
            rows.append({"provider": provider, "time_ms": ms, "peak_step_bytes": peak})
            print(f"train step {args.dtype} batch {args.batch} {provider}: {ms:.2f} ms, peak {peak / 2**20:.0f} MiB",
                  flush=True)
        except Exception as e:  # one failing provider must not stop the others
            rows.append({"provider": provider, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"train step {provider}: FAILED {type(e).__name__}: {e}", flush=True)
        finally:
            chain = x = step = None
            torch.cuda.empty_cache()
    times = {r["provider"]: r for r in rows if "time_ms" in r}
    for layout in ("", "_channels_last"):
        ours, eager = times.get("lwkernels" + layout), times.get("eager" + layout)
        if ours and eager:
            ours["speedup_vs_eager"] = eager["time_ms"] / ours["time_ms"]
            ours["peak_vs_eager"] = ours["peak_step_bytes"] / max(eager["peak_step_bytes"], 1)
    result = {"batch": args.batch, "dtype": args.dtype, "model": "chain of the nine benchmark blocks",
              "rows": rows, "skipped": skipped, "seconds": time.time() - start}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
