"""Where the time goes, lwkernels vs ONNX Runtime (and PyTorch eager), per layer.

    python benchmarks/ort_profile.py --batch 1 8 --out benchmarks/results/ort-profile-<cpu>.md

For each workload (lwkernels.bench.workloads: the benchmark-block chain, LightweightNet and
MobileNetV1 at 224, or a torchvision model after fuse(), e.g. ``torchvision:mnasnet1_0``) and batch:

- lwkernels and eager: the whole model runs as usual, with forward hooks on every layer (the
  blocks, stem, pool, classifier) recording each layer's wall time in place; what the layers do
  not cover (flatten, Python glue) is the "other" row.
- ONNX Runtime: its profiler (SessionOptions.enable_profiling) gives every node's kernel time;
  nodes are attributed to layers by the module path the exporter writes into their names (ORT
  keeps it through its graph rewrites); reorders and the like are listed by their own names.
- All three take turns in rounds with pauses between them (harness.time_in_rounds' method), and
  the whole-call medians are timed the same way without hooks or profiler.
- Hooks break lwkernels' native sequences (a model's fused calls run by one native call) into
  module calls, so the per-layer lwkernels column is the modules' cost, not the sequence's; a
  second table times every kernel call inside the sequences by their own clock
  (NativeSequence/PreparedChain.time_steps), over whole calls without hooks.

Tables give medians over all calls (a layer's ORT time is the sum of its nodes' medians), and the
fastest call (sum of the nodes' fastest), a floor that other processes' load inflates less. The
Markdown also lists what ORT's optimised graph is made of (op types, the NCHWc layout nodes).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Dict, List


def _hooked_layers(model, layers: List[str], sink: Dict[str, List[float]], shapes: Dict[str, tuple]):
    modules = dict(model.named_modules())
    handles, starts = [], {}
    for path in layers:
        def pre(_m, _inp, path=path):
            starts[path] = time.perf_counter()

        def post(_m, _inp, out, path=path):
            sink.setdefault(path, []).append(time.perf_counter() - starts[path])
            shapes[path] = tuple(out.shape)

        handles += [modules[path].register_forward_pre_hook(pre), modules[path].register_forward_hook(post)]
    return handles


def _layer_of(node_name: str, layers: List[str], output_name: str = "y") -> str:
    """The layer a node belongs to: the exporter names nodes after module paths (/features/features.3/...);
    ORT names a rewritten node after its output, so the node making the graph output is the last layer's."""
    name = re.sub(r"_kernel_time$", "", node_name)
    for path in sorted(layers, key=len, reverse=True):
        if f"/{path}/" in name or name.startswith(f"{path}/"):
            return path
    if name == output_name or name.startswith(output_name + "_"):
        return layers[-1]
    # A node named after a module fuse() folded into the fused layer before it (a BatchNorm or
    # activation at layers.2 of a stem at layers.0): the last listed layer of that container at or
    # before its index.
    m = re.search(r"(?:^|/)(\w+)\.(\d+)(?:/|$)", name)
    if m:
        container, index = m.group(1), int(m.group(2))
        before = [p for p in layers if p.startswith(container + ".") and p[len(container) + 1:].isdigit()
                  and int(p[len(container) + 1:]) <= index]
        if before:
            return max(before, key=lambda p: int(p[len(container) + 1:]))
    return "other: " + name.strip("/")


def _describe(module) -> str:
    from torch import nn

    dw = getattr(module, "depthwise", None)
    pw = getattr(module, "pointwise", None)
    if isinstance(dw, nn.Conv2d) and isinstance(pw, nn.Conv2d):
        return (f"block {dw.in_channels}->{pw.out_channels} s{dw.stride[0]} d{dw.dilation[0]}"
                + (" +midBN" if getattr(module, "mid_bn", None) is not None else ""))
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1 and c.groups == c.in_channels]
    if depthwise:  # a stack of inverted residuals (torchvision's models)
        k, stride = depthwise[0].kernel_size[0], max(c.stride[0] for c in depthwise)
        return (f"{len(depthwise)} x IR {convs[0].in_channels}->{convs[-1].out_channels} "
                f"(x{depthwise[0].in_channels // convs[0].in_channels}) {k}x{k} s{stride}")
    if convs:
        c = convs[0]
        return f"conv {c.kernel_size[0]}x{c.kernel_size[1]} {c.in_channels}->{c.out_channels} s{c.stride[0]}"
    return type(module).__name__


def profile(name: str, batch: int, min_time: float, rounds: int, idle_cpu, tmp: str) -> Dict:
    import onnx
    import torch

    from lwkernels.bench.harness import ROUND_PAUSE, make_provider, medians, thread_pool, time_in_rounds
    from lwkernels.bench.onnxrt import export_onnx, make_session
    from lwkernels.bench.workloads import build_workload

    w = build_workload(name, batch)
    prefix = os.path.join(tmp, f"{name}-b{batch}")
    session = make_session(export_onnx(w.reference, w.x), torch.get_num_threads(), profile_prefix=prefix,
                           optimized_model_path=prefix + "-optimized.onnx")
    fns = {p: make_provider(p, w.fused, w.x, w.reference) for p in ("eager", "lwkernels")}
    fns["onnxruntime"] = make_provider("onnxruntime", w.fused, w.x, w.reference)  # no profiler: wall times
    profiled_ort = lambda: session.run(None, {session.get_inputs()[0].name: w.x.numpy()})  # noqa: E731
    pools = {p: thread_pool(p) for p in fns}

    # 1. Whole calls, no hooks or profiler.
    for fn in fns.values():
        fn()
    whole_times = time_in_rounds(fns, min_time, rounds, ROUND_PAUSE, pools=pools, idle_cpu=idle_cpu)
    whole = medians(whole_times)
    fastest = {p: min(t) for p, t in whole_times.items()}

    # 2. Per layer: hooks on the PyTorch models, the profiler on a second ORT session.
    layer_times = {"eager": {}, "lwkernels": {}}
    shapes: Dict[str, tuple] = {}
    handles = (_hooked_layers(w.reference, w.layers, layer_times["eager"], shapes)
               + _hooked_layers(w.fused, w.layers, layer_times["lwkernels"], shapes))
    hooked = dict(fns, onnxruntime=profiled_ort)
    time_in_rounds(hooked, min_time, rounds, ROUND_PAUSE, pools=pools, idle_cpu=idle_cpu)
    for h in handles:
        h.remove()
    with open(session.end_profiling()) as f:
        events = json.load(f)
    node_durs: Dict[str, List[float]] = collections.defaultdict(list)
    node_ops: Dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node_durs[e["name"]].append(e["dur"] * 1e-6)
            node_ops[e["name"]] = e["args"].get("op_name", "?")
    ort_layers: Dict[str, float] = collections.defaultdict(float)
    ort_fastest: Dict[str, float] = collections.defaultdict(float)
    ort_ops: Dict[str, List[str]] = collections.defaultdict(list)
    for node, durs in node_durs.items():
        layer = _layer_of(node, w.layers)
        ort_layers[layer] += statistics.median(durs)
        ort_fastest[layer] += min(durs)
        ort_ops[layer].append(node_ops[node])

    modules = dict(w.reference.named_modules())
    rows = []
    for path in w.layers:
        rows.append({"layer": path, "what": _describe(modules[path]), "out": shapes.get(path),
                     "eager_ms": statistics.median(layer_times["eager"][path]) * 1e3,
                     "lwkernels_ms": statistics.median(layer_times["lwkernels"][path]) * 1e3,
                     "onnxruntime_ms": ort_layers.pop(path, 0.0) * 1e3,
                     "lwkernels_fastest_ms": min(layer_times["lwkernels"][path]) * 1e3,
                     "onnxruntime_fastest_ms": ort_fastest.pop(path, 0.0) * 1e3, "ort_ops": ort_ops.pop(path, [])})
    for layer, seconds in sorted(ort_layers.items()):  # ORT nodes of no layer (reorders, flatten)
        rows.append({"layer": layer, "what": "", "out": None, "eager_ms": None, "lwkernels_ms": None,
                     "onnxruntime_ms": seconds * 1e3, "lwkernels_fastest_ms": None,
                     "onnxruntime_fastest_ms": ort_fastest[layer] * 1e3, "ort_ops": ort_ops[layer]})

    steps = _native_step_times(w.fused, fns["lwkernels"], max(20, rounds * 10))

    graph = onnx.load(prefix + "-optimized.onnx").graph
    ops = collections.Counter(f"{n.domain + ':' if n.domain else ''}{n.op_type}" for n in graph.node)
    fused_acts = collections.Counter(
        a.s.decode() for n in graph.node for a in n.attribute if n.op_type == "Conv" and a.name == "activation")
    layouts = [n.name for n in graph.node if n.op_type.startswith("Reorder")]
    return {"workload": name, "batch": batch, "input": list(w.x.shape), "whole_ms": {p: t * 1e3 for p, t in whole.items()},
            "whole_fastest_ms": {p: t * 1e3 for p, t in fastest.items()},
            "rows": rows, "native_steps": steps, "ort_graph": {"ops": dict(ops), "fused_activations": dict(fused_acts), "reorders": layouts,
                                        "nodes": len(graph.node)}}


def _native_step_times(model, call, runs: int) -> Dict:
    """Every kernel call inside lwkernels' native sequences (the calls of step 2's hooks break those
    sequences up): the sequences' own clock over `runs` whole calls back to back without hooks, in
    order; those calls' median wall time, and the medians of each call's kernel time and of its
    wall time minus that (per call: a few calls in which one step waits for an interrupted thread
    make the sum of the steps' medians smaller than a typical call's kernel time)."""
    from lwkernels.cpu.native_sequence import native_plans

    # (Step 2's hooks stopped the replays; a LayoutSequential tries again at growing intervals of
    # calls, up to 1024.)
    for _ in range(1100):
        call()
        plans = native_plans(model)
        if plans:
            break
    for _ in range(5):  # (a fused classifier prepares its plan a call after its body's replay)
        call()
    plans = native_plans(model)
    seconds: Dict[tuple, List[float]] = collections.defaultdict(list)
    alone: Dict[tuple, List[float]] = collections.defaultdict(list)
    idle: Dict[tuple, List[float]] = collections.defaultdict(list)
    labels: Dict[tuple, str] = {}
    walls: List[float] = []
    kernels: List[float] = []
    for _ in range(runs):
        for plan in plans:
            plan.time_steps(True)  # (drops the last call's: a plan this call does not run stays empty)
        start = time.perf_counter()
        call()
        walls.append(time.perf_counter() - start)
        kernels.append(sum(sum(plan.step_seconds()) for plan in plans))
        for i, plan in enumerate(plans):
            for j, (label, s, t) in enumerate(zip(plan.step_labels(), plan.step_seconds(), plan.step_threads())):
                seconds[(i, j)].append(s)
                alone[(i, j)].append(t["alone"])
                idle[(i, j)].append(t["idle"])
                labels[(i, j)] = label
    for plan in plans:
        plan.time_steps(False)
    steps = [{"step": labels[k], "ms": statistics.median(v) * 1e3, "fastest_ms": min(v) * 1e3, "calls": len(v),
              "alone_ms": statistics.median(alone[k]) * 1e3, "idle_thread_ms": statistics.median(idle[k]) * 1e3}
             for k, v in sorted(seconds.items())]
    return {"steps": steps, "whole_ms": statistics.median(walls) * 1e3, "runs": runs,
            "kernels_ms": statistics.median(kernels) * 1e3,
            "outside_ms": statistics.median(w - k for w, k in zip(walls, kernels)) * 1e3}


def _fmt(v, digits=3):
    return "" if v is None else f"{v:.{digits}f}"


def to_markdown(result: Dict) -> str:
    lines = [f"### {result['workload']}, batch {result['batch']} (input {'x'.join(map(str, result['input']))})", ""]
    whole = result["whole_ms"]
    lines.append(f"Whole call (no hooks, no profiler), medians: eager {whole['eager']:.2f} ms, "
                 f"ONNX Runtime {whole['onnxruntime']:.2f} ms, lwkernels {whole['lwkernels']:.2f} ms: "
                 f"lwkernels / ORT {whole['onnxruntime'] / whole['lwkernels']:.2f}x, "
                 f"lwkernels / eager {whole['eager'] / whole['lwkernels']:.2f}x. Fastest calls: "
                 + ", ".join(f"{p} {t:.2f} ms" for p, t in result["whole_fastest_ms"].items()) + ".")
    lines += ["", "| layer | what | output | eager ms | lwkernels ms | ORT ms | lwkernels / ORT "
              "| fastest: lwkernels ms | ORT ms | lwkernels / ORT | ORT nodes |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    sums = {"eager_ms": 0.0, "lwkernels_ms": 0.0, "onnxruntime_ms": 0.0, "lwkernels_fastest_ms": 0.0,
            "onnxruntime_fastest_ms": 0.0}
    for r in result["rows"]:
        for k in sums:
            sums[k] += r[k] or 0.0
        ratio = (f"{r['onnxruntime_ms'] / r['lwkernels_ms']:.2f}x"
                 if r["lwkernels_ms"] and r["onnxruntime_ms"] else "")
        fast_ratio = (f"{r['onnxruntime_fastest_ms'] / r['lwkernels_fastest_ms']:.2f}x"
                      if r["lwkernels_fastest_ms"] and r["onnxruntime_fastest_ms"] else "")
        out = "x".join(map(str, r["out"][1:])) if r["out"] else ""
        ops = ", ".join(f"{n} {op}" if n > 1 else op for op, n in collections.Counter(r["ort_ops"]).items())
        lines.append(f"| {r['layer']} | {r['what']} | {out} | {_fmt(r['eager_ms'])} | {_fmt(r['lwkernels_ms'])} | "
                     f"{_fmt(r['onnxruntime_ms'])} | {ratio} | {_fmt(r['lwkernels_fastest_ms'])} | "
                     f"{_fmt(r['onnxruntime_fastest_ms'])} | {fast_ratio} | {ops} |")
    lines.append(f"| sum of rows | | | {sums['eager_ms']:.3f} | {sums['lwkernels_ms']:.3f} | "
                 f"{sums['onnxruntime_ms']:.3f} | {sums['onnxruntime_ms'] / sums['lwkernels_ms']:.2f}x | "
                 f"{sums['lwkernels_fastest_ms']:.3f} | {sums['onnxruntime_fastest_ms']:.3f} | "
                 f"{sums['onnxruntime_fastest_ms'] / sums['lwkernels_fastest_ms']:.2f}x | |")
    native = result.get("native_steps") or {}
    steps = native.get("steps") or []
    if steps:
        total = sum(r["ms"] for r in steps)
        lines += ["", f"Inside lwkernels' native calls ({native['runs']} whole calls back to back, no hooks; each "
                  "kernel call timed by the sequence itself; *alone*: the calling thread outside parallel "
                  "regions, set-up and single-task work, while the others wait; *idle*: thread time inside "
                  "the regions without a task, summed over threads):", "",
                  "| kernel call | median ms | fastest ms | alone ms | idle thread-ms |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['step']} | {r['ms']:.3f} | {r['fastest_ms']:.3f} | {r.get('alone_ms', 0):.3f} | "
                  f"{r.get('idle_thread_ms', 0):.3f} |" for r in steps]
        lines.append(f"| sum | {total:.3f} | {sum(r['fastest_ms'] for r in steps):.3f} | "
                     f"{sum(r.get('alone_ms', 0) for r in steps):.3f} | "
                     f"{sum(r.get('idle_thread_ms', 0) for r in steps):.3f} |")
        lines += ["", f"Those calls: median wall time {native['whole_ms']:.3f} ms, median kernel time per call "
                  f"{native['kernels_ms']:.3f} ms (the sum of the steps' medians is smaller: a step now and then "
                  f"waits for an interrupted thread), median {native['outside_ms']:.3f} ms per call outside the "
                  "kernel calls (Python, PyTorch's ops, output allocation). Back to back they run warmer than "
                  "the whole calls above, which take turns with the other engines."]
    g = result["ort_graph"]
    lines += ["", f"ORT's optimised graph: {g['nodes']} nodes: "
              + ", ".join(f"{n} {op}" for op, n in sorted(g["ops"].items(), key=lambda kv: -kv[1]))
              + f"; activations fused into convs: {g['fused_activations'] or 'none'}; layout reorders: "
              + (", ".join(g["reorders"]) or "none") + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["chain", "lightweightnet", "mobilenetv1"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of calls per provider (each pass)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--idle-cpu", type=float, default=None,
                   help="before each turn wait until other processes keep the CPUs at most this busy (0-1)")
    p.add_argument("--threads", type=int, default=None, help="threads for both engines (default: torch's)")
    p.add_argument("--out", default=None, help="write the Markdown tables here (and JSON next to it)")
    args = p.parse_args(argv)

    import onnxruntime
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from lwkernels.bench.harness import environment

    env = dict(environment("cpu"), onnxruntime=onnxruntime.__version__)
    header = (f"{env['device']}, CPU path {env['cpu_path']} ({env['cpu_parallel']}), {torch.get_num_threads()} threads, "
              f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, fp32, NCHW input")
    print(header, flush=True)
    results, parts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads:
            for batch in args.batch:
                result = profile(name, batch, args.min_time, args.rounds, args.idle_cpu, tmp)
                results.append(result)
                parts.append(to_markdown(result))
                print(parts[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"<!-- {header} -->\n\n" + "\n".join(parts))
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"environment": env, "min_time_s": args.min_time, "rounds": args.rounds, "results": results},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
