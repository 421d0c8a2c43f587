"""Training-step benchmarks and activation-memory measurement: JointBlock (fused training op) vs
the plain PyTorch composition, side by side in one process. Used by benchmarks/test_bench_train.py
and `lwkernels bench --train` (print_train_bench)."""
from __future__ import annotations

import json
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .harness import environment, geomean, make_block, make_input, median_time
from ..nn.fuse import to_reference
from ..models.shapes import BENCHMARK_BLOCKS, BlockShape, lightweightnet_blocks

#: Training-step providers: the reference composition and lwkernels, each in NCHW and channels_last.
TRAIN_PROVIDERS = ("eager", "eager_channels_last", "lwkernels", "lwkernels_channels_last")


def make_train_step(name: str, module: nn.Module, x: torch.Tensor,
                    reference: Optional[nn.Module] = None) -> Callable[[], torch.Tensor]:
    """A no-argument callable running one forward + backward of `module` (training mode) on `x`
    the way provider `name` does; x requires grad (as inside a network) and parameter gradients are
    reset to None each call (as optimizer.zero_grad() does)."""
    if name.startswith("eager"):
        model = reference if reference is not None else to_reference(module)
    elif name.startswith("lwkernels"):
        model = module
    else:
        raise ValueError(f"unknown provider {name!r}; expected one of {TRAIN_PROVIDERS}")
    model.train()
    arg = x.detach().clone()
    if name.endswith("channels_last"):
        model = model.to(memory_format=torch.channels_last)
        arg = arg.contiguous(memory_format=torch.channels_last)
    arg.requires_grad_(True)
    with torch.no_grad():
        grad = torch.randn_like(model(arg))
    params = list(model.parameters())
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def run() -> torch.Tensor:
        for p in params:
            p.grad = None
        arg.grad = None
        y = model(arg)
        y.backward(grad)
        sync()
        return y

    return run


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, residual: bool = False) -> int:
    """Bytes autograd keeps for backward after a training forward of `model` on `x`: the distinct
    storages of every tensor saved for backward (torch.autograd.graph.saved_tensors_hooks), not
    counting parameters. This is activation memory, the part that grows with batch and depth."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    model.train()
    arg = x.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(arg)
    del y
    return sum(storages.values())


def lightweightnet_chain(input_size: int = 224, dtype=torch.float32, device="cpu") -> nn.Sequential:
    """LightweightNet's nine joint blocks in sequence (JointBlocks; to_reference() for the twin)."""
    shapes = lightweightnet_blocks(input_size)
    return nn.Sequential(*(make_block(s, dtype, device, seed=k) for k, s in enumerate(shapes)))


def memory_report(batch: int = 8, input_size: int = 224, dtype=torch.float32, device="cpu") -> Dict[str, int]:
    """Saved-for-backward bytes of one training forward of the LightweightNet chain, both ways."""
    chain = lightweightnet_chain(input_size, dtype, device)
    ref = to_reference(chain)
    x = make_input(lightweightnet_blocks(input_size)[0], batch, dtype, device)
    return {"reference": saved_activation_bytes(ref, x), "lwkernels": saved_activation_bytes(chain, x)}


def print_train_bench(batch: int = 8, device: str = "cpu", dtype: torch.dtype = torch.float32, min_time: float = 0.5,
                      json_path: Optional[str] = None, shapes: Optional[List[BlockShape]] = None) -> Dict:
    """Median forward+backward time per BENCHMARK_BLOCKS shape, reference vs lwkernels (NCHW and
    channels_last), the geometric mean of the speedups, and the saved-activation bytes of the
    LightweightNet chain both ways. Prints a table; writes JSON to `json_path` when given."""
    shapes = list(shapes or BENCHMARK_BLOCKS)
    env = environment(device)
    print(f"# training step (forward + backward), batch {batch}, {dtype}, {device}: "
          + ", ".join(f"{k}={v}" for k, v in env.items()))
    header = f"{'block':<22}" + "".join(f"{p:>26}" for p in TRAIN_PROVIDERS) + f"{'speedup':>9}{'speedup_cl':>11}"
    print(header)
    rows = []
    for shape in shapes:
        block = make_block(shape, dtype, device)
        ref = to_reference(block)
        x = make_input(shape, batch, dtype, device)
        times = {}
        for name in TRAIN_PROVIDERS:
            step = make_train_step(name, block if name.startswith("lwkernels") else ref, x,
                                   reference=ref if name.startswith("eager") else None)
            times[name] = median_time(step, min_time=min_time)
        speedup = times["eager"] / times["lwkernels"]
        speedup_cl = times["eager_channels_last"] / times["lwkernels_channels_last"]
        rows.append({"block": shape.name, "ms": {k: v * 1e3 for k, v in times.items()}, "speedup": speedup,
                     "speedup_channels_last": speedup_cl})
        print(f"{shape.name:<22}" + "".join(f"{times[p] * 1e3:>23.2f} ms" for p in TRAIN_PROVIDERS)
              + f"{speedup:>8.2f}x{speedup_cl:>10.2f}x")
    geo = geomean([r["speedup"] for r in rows])
    geo_cl = geomean([r["speedup_channels_last"] for r in rows])
    print(f"geometric mean speedup vs eager: NCHW {geo:.2f}x, channels_last {geo_cl:.2f}x")
    mem = memory_report(batch=min(batch, 2), dtype=dtype, device=device)
    print(f"saved activations, LightweightNet chain (224, batch {min(batch, 2)}): reference "
          f"{mem['reference'] / 2**20:.1f} MiB, lwkernels {mem['lwkernels'] / 2**20:.1f} MiB "
          f"({mem['lwkernels'] / mem['reference']:.2f}x)")
    result = {"environment": env, "batch": batch, "dtype": str(dtype), "rows": rows, "geomean_speedup": geo,
              "geomean_speedup_channels_last": geo_cl, "saved_activation_bytes": mem}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":  # python -m lwkernels.bench.training
    print_train_bench()
