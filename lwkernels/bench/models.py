"""Whole-model throughput, reference vs fused (and ONNX Runtime), measured side by side in one process.

    rows = run_model_bench("lightweightnet", batch=1, device="cpu", input_size=224, train=True,
                           onnxruntime=True)
    print(format_rows(rows))

`lwkernels bench --model NAME` calls :func:`print_model_bench`. For each mode (inference, and a
training step when asked) the plain-PyTorch twin of the model (every JointBlock replaced by
JointBlockReference, same weights) and the fused model are timed side by side so that drifting
machine load hits both; the rows give medians. Inference is timed in rounds
(:func:`lwkernels.bench.harness.time_in_rounds`), which also admits ONNX Runtime running the
reference twin exported to ONNX (``onnxruntime=True``: CPU, fp32, onnxruntime installed) without
billing one engine's spinning threads to the other; training steps alternate call by call (both
run on PyTorch's threads). Inference is checked first (fused and ONNX Runtime logits against the
reference) and the errors are reported in the rows.

A training step (forward, cross-entropy, backward, SGD step) of a fused model runs each JointBlock
through the fused training op (ops/training.py: batch statistics from the fused forward, the block's own
backward); the reference twin runs plain nn.Conv2d / nn.BatchNorm2d.
"""
from __future__ import annotations

import json
import sys
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models import build_model, to_reference

PROVIDERS = ("reference", "compile", "onnxruntime", "lwkernels")

#: Prefix of model names taken from torchvision (``torchvision:mobilenet_v2``): the reference is the
#: torchvision model itself, the fused model what lwkernels.fuse() makes of it.
TORCHVISION_PREFIX = "torchvision:"


def default_input_size(model_name: str) -> int:
    """224 (the papers' ImageNet-size input) except for the 32 x 32 multi-scale network."""
    return 32 if model_name.lower().replace("-", "").replace("_", "") == "multiscalenet" else 224


def torchvision_pair(name: str, num_classes: int, seed: int):
    """(fused, reference) for torchvision model `name` with random weights and BatchNorm statistics."""
    try:
        import torchvision
    except Exception as e:  # ImportError, or a torchvision built for another torch
        raise RuntimeError(f"{TORCHVISION_PREFIX}{name} needs an importable torchvision ({e})") from None
    from ..nn.fuse import fuse

    ctor = getattr(torchvision.models, name, None)
    if ctor is None:
        raise ValueError(f"torchvision.models has no model {name!r}")
    torch.manual_seed(seed)
    reference = ctor(num_classes=num_classes)
    _randomize_batchnorm(reference, seed)
    fused, _ = fuse(reference)
    return fused, reference


def _randomize_batchnorm(model: nn.Module, seed: int) -> None:
    from .harness import randomize_batchnorm

    randomize_batchnorm(model, seed)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _inference_step(model: nn.Module, x: torch.Tensor, sync) -> Callable[[], None]:
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model(x)
        sync()

    return step


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sync) -> Callable[[], None]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
        sync()

    return step


def _time_side_by_side(steps: Dict[str, Callable[[], None]], repeats: int, warmup: int,
                       min_time: Optional[float], max_repeats: int = 1000) -> Dict[str, List[float]]:
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    while True:
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        n = len(next(iter(times.values())))
        if n >= max_repeats:
            break
        enough_time = min_time is None or all(sum(t) >= min_time for t in times.values())
        if n >= repeats and enough_time:
            break
    return times


def _time_in_rounds(steps: Dict[str, Callable[[], None]], repeats: int, warmup: int, min_time: Optional[float],
                    rounds: int, pause: Optional[float], idle_cpu: Optional[float]) -> Dict[str, List[float]]:
    from .harness import ROUND_PAUSE, thread_pool, time_in_rounds

    if rounds < 1:
        raise ValueError(f"rounds must be positive, got {rounds}")
    for step in steps.values():  # first calls (allocations, caches) before any round
        for _ in range(warmup):
            step()
    return time_in_rounds(steps, min_time or 0.0, rounds, ROUND_PAUSE if pause is None else pause, warmup=1,
                          min_calls=max(1, -(-repeats // rounds)), max_calls=1000,
                          pools={p: thread_pool(p) for p in steps}, idle_cpu=idle_cpu)


def run_model_bench(model_name: str, batch: int = 1, device="cpu", dtype: torch.dtype = torch.float32,
                    threads: Optional[int] = None, train: bool = False, input_size: Optional[int] = None,
                    repeats: int = 20, warmup: int = 3, min_time: Optional[float] = None, width_mult: float = 1.0,
                    num_classes: int = 10, channels_last: bool = False, seed: int = 0, onnxruntime: bool = False,
                    rounds: int = 5, pause: Optional[float] = None, idle_cpu: Optional[float] = None,
                    compile: bool = False) -> List[Dict]:
    """Median time per call of `model_name` (see lwkernels.models.MODELS, or ``torchvision:NAME``),
    reference vs fused (and torch.compile of the reference when `compile`, inference only).

    Returns one row per (mode, provider): mode "inference" (and "train" when `train`; batch at least 2
    there, as BatchNorm in training needs it), provider
    "reference", "onnxruntime" (inference only, when `onnxruntime`) or "lwkernels", with median/min
    ms, images/s, speedup over the reference, ``vs_onnxruntime`` (ONNX Runtime's median over this
    row's: above 1 is faster than ORT) when ORT ran, and (for inference) the max error of the
    row's logits relative to the largest reference logit. Inference runs `rounds` rounds of at least
    ``repeats / rounds`` calls per provider (and `min_time` / `rounds` seconds), `pause` seconds
    between thread pools (harness.ROUND_PAUSE by default), waiting for `idle_cpu` (see
    harness.time_in_rounds) when given."""
    device = torch.device(device)
    if batch < 1 or repeats < 1:
        raise ValueError("batch and repeats must be positive")
    input_size = input_size or (224 if model_name.startswith(TORCHVISION_PREFIX) else default_input_size(model_name))
    old_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    try:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if model_name.startswith(TORCHVISION_PREFIX):
            fused, reference = torchvision_pair(model_name[len(TORCHVISION_PREFIX):], num_classes, seed)
            reference = reference.to(device=device, dtype=dtype, memory_format=memory_format).eval()
        else:
            torch.manual_seed(seed)
            fused = build_model(model_name, num_classes=num_classes, width_mult=width_mult)
            _randomize_batchnorm(fused, seed)
            reference = None
        fused = fused.to(device=device, dtype=dtype, memory_format=memory_format).eval()
        if reference is None:
            reference = to_reference(fused)
        models = {"reference": reference, "lwkernels": fused}
        if onnxruntime and (device.type != "cpu" or dtype != torch.float32):
            raise ValueError("the onnxruntime provider runs fp32 on the CPU only")
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, input_size, input_size, generator=g).to(device=device, dtype=dtype)
        x = x.contiguous(memory_format=memory_format)
        y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
        sync = _sync(device)

        with torch.inference_mode():
            expected, got = reference(x).double(), fused(x).double()
        scale = expected.abs().max().item() or 1.0
        errors = {"lwkernels": (got - expected).abs().max().item() / scale}
        ort_step = None
        if onnxruntime:
            from .onnxrt import make_ort_provider

            ort_step = make_ort_provider(reference, x)
            errors["onnxruntime"] = (ort_step().double() - expected).abs().max().item() / scale
        compiled = None
        if compile:  # (compiled here, outside the timing, and checked like the others)
            from .harness import allow_one_compile_per_shape

            allow_one_compile_per_shape()
            compiled = torch.compile(_copy(reference))
            with torch.inference_mode():
                errors["compile"] = (compiled(x).double() - expected).abs().max().item() / scale

        base = {"model": model_name, "batch": batch, "input_size": input_size, "device": str(device),
                "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                "width_mult": width_mult, "channels_last": channels_last}
        rows: List[Dict] = []
        modes = ["inference"] + (["train"] if train else [])
        for mode in modes:
            if mode == "inference":
                steps = {p: _inference_step(m, x, sync) for p, m in models.items()}
                if compiled is not None:
                    steps["compile"] = _inference_step(compiled, x, sync)
                if ort_step is not None:
                    steps["onnxruntime"] = ort_step
                steps = {p: steps[p] for p in PROVIDERS if p in steps}
                times = _time_in_rounds(steps, repeats, warmup, min_time, rounds, pause, idle_cpu)
            else:  # separate copies: the optimizer steps must not leak into the other provider's weights
                # BatchNorm needs 2 values per channel in training: batch 1 with a 1x1 final map would fail.
                xt, yt = (x, y) if batch > 1 else (x.expand(2, -1, -1, -1).contiguous(memory_format=memory_format),
                                                   y.expand(2).contiguous())
                steps = {p: _train_step(to_reference(m) if p == "reference" else _copy(m), xt, yt, sync)
                         for p, m in models.items()}
                times = _time_side_by_side(steps, repeats, warmup, min_time)
            ref_median = statistics.median(times["reference"])
            ort_median = statistics.median(times["onnxruntime"]) if "onnxruntime" in times else None
            n = batch if mode == "inference" else max(batch, 2)
            for provider in (p for p in PROVIDERS if p in times):
                median = statistics.median(times[provider])
                row = dict(base, batch=n, mode=mode, provider=provider, median_ms=median * 1e3,
                           min_ms=min(times[provider]) * 1e3, repeats=len(times[provider]),
                           images_per_s=n / median, speedup=ref_median / median,
                           max_rel_error=errors.get(provider) if mode == "inference" else None)
                if ort_median is not None:
                    row["vs_onnxruntime"] = ort_median / median
                rows.append(row)
        return rows
    finally:
        torch.set_num_threads(old_threads)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def format_rows(rows: List[Dict]) -> str:
    ort = any("vs_onnxruntime" in r for r in rows)
    headers = ["model", "mode", "provider", "batch", "input", "median ms", "min ms", "images/s", "speedup"]
    headers += ["vs ORT"] if ort else []
    table = [[r["model"], r["mode"], r["provider"], str(r["batch"]), str(r["input_size"]), f"{r['median_ms']:.3f}",
              f"{r['min_ms']:.3f}", f"{r['images_per_s']:.1f}", f"{r['speedup']:.2f}x"]
             + ([f"{r['vs_onnxruntime']:.2f}x" if "vs_onnxruntime" in r else ""] if ort else []) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in table)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    for line in table:
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(lines)


def print_model_bench(model_name: str, batch: int = 1, device="cpu", dtype: torch.dtype = torch.float32,
                      min_time: float = 0.3, json_path: Optional[str] = None, threads: Optional[int] = None,
                      train: bool = True, input_size: Optional[int] = None, width_mult: float = 1.0,
                      repeats: int = 5, onnxruntime: bool = False, rounds: int = 5,
                      pause: Optional[float] = None, idle_cpu: Optional[float] = None, compile: bool = False) -> int:
    """`lwkernels bench --model NAME`: print the side-by-side table (and write JSON); 1 on a mismatch."""
    from .harness import ROUND_PAUSE, environment

    rows = run_model_bench(model_name, batch=batch, device=device, dtype=dtype, threads=threads, train=train,
                           input_size=input_size, repeats=repeats, min_time=min_time, width_mult=width_mult,
                           onnxruntime=onnxruntime, rounds=rounds, pause=pause, idle_cpu=idle_cpu, compile=compile)
    env = environment(str(device))
    if onnxruntime:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
    print(f"lwkernels bench --model {model_name}: {env['device']}, {device}, {rows[0]['dtype']}, batch {batch}, "
          f"input {rows[0]['input_size']}, threads {rows[0]['threads']}, torch {env['torch']}"
          + (f", onnxruntime {env['onnxruntime']}" if onnxruntime else ""))
    print(format_rows(rows))
    errors = {r["provider"]: r["max_rel_error"] for r in rows if r["max_rel_error"] is not None}
    tol = {torch.float32: 1e-3, torch.float64: 1e-9}.get(dtype, 5e-2)
    pause = ROUND_PAUSE if pause is None else pause
    print("; ".join(f"{p} vs reference logits: max error {e:.2e} of the largest logit" for p, e in errors.items())
          + f" (tolerance {tol:g})")
    print(f"speedup = reference median / median; inference in {rounds} rounds per provider, {pause:g} s pause "
          "where the thread pool changes" + ("; training steps alternating call by call" if train else "")
          + ("; vs ORT = onnxruntime median / median (above 1: faster than ONNX Runtime)" if onnxruntime else ""))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"environment": env, "timing": {"method": "rounds", "rounds": rounds, "pause_s": pause,
                                                      "min_time_s": min_time, "idle_cpu": idle_cpu},
                       "rows": rows}, f, indent=2)
    bad = {p: e for p, e in errors.items() if not e <= tol}
    for p, e in bad.items():
        print(f"MISMATCH: {p} differs from the reference by {e:.2e}", file=sys.stderr)
    return 1 if bad else 0
