"""The workloads compared with ONNX Runtime, by name: the nine benchmark blocks back to back, and
whole models at 224 input. Each comes as the fused module, its plain-PyTorch twin (same weights),
an input, and the paths of its layers (what per-layer profiles report).

    w = build_workload("lightweightnet", batch=8)
    w.fused(w.x); w.reference(w.x); w.layers   # ["features.0", ..., "pool", "classifier"]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

from ..models import build_model
from ..models.shapes import BENCHMARK_BLOCKS
from ..nn.chain import JointChain
from ..nn.fuse import to_reference
from .harness import make_block, make_input, randomize_batchnorm
from .models import TORCHVISION_PREFIX

#: "chain": shapes.BENCHMARK_BLOCKS back to back (32 x 112 x 112 input); the others are
#: lwkernels.models at 224 input with 10 classes (as `lwkernels bench --model`). Besides these,
#: "torchvision:NAME" is torchvision's model NAME (random weights, 10 classes) after fuse(), its
#: reference the torchvision model itself (needs an importable torchvision).
WORKLOADS = ("chain", "lightweightnet", "mobilenetv1")


@dataclass
class Workload:
    name: str
    fused: nn.Module
    reference: nn.Module
    x: torch.Tensor
    layers: List[str]  # module paths, in call order, that together make the forward

    @property
    def description(self) -> str:
        return f"{self.name}, input {tuple(self.x.shape)}"


def build_workload(name: str, batch: int = 1, seed: int = 0) -> Workload:
    """The fused module (eval), its reference twin and a random NCHW fp32 input of `batch` images."""
    if name == "chain":
        fused = JointChain(*(make_block(s, seed=k) for k, s in enumerate(BENCHMARK_BLOCKS))).eval()
        x = make_input(BENCHMARK_BLOCKS[0], batch, seed=seed)
    elif name.startswith(TORCHVISION_PREFIX):
        from .models import torchvision_pair

        fused, reference = torchvision_pair(name[len(TORCHVISION_PREFIX):], num_classes=10, seed=seed)
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
        return Workload(name, fused.eval(), reference.eval(), x, _layers(fused))
    elif name in WORKLOADS:
        torch.manual_seed(seed)
        fused = randomize_batchnorm(build_model(name, num_classes=10), seed).eval()
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"unknown workload {name!r}; choose one of {WORKLOADS} or "
                         f"{TORCHVISION_PREFIX}NAME (a torchvision model, after fuse())")
    return Workload(name, fused, to_reference(fused).eval(), x, _layers(fused))


def _layers(model: nn.Module) -> List[str]:
    """Top-level children in order, with Sequentials of blocks (``features``; torchvision's MNASNet:
    ``layers``) split into their members, leaving out what fuse() turned into nn.Identity."""
    layers = []
    for name, child in model.named_children():
        if name in ("features", "layers") and isinstance(child, nn.Sequential):
            layers += [f"{name}.{k}" for k, c in child.named_children() if not isinstance(c, nn.Identity)]
        elif not isinstance(child, (nn.Dropout, nn.Identity)):
            layers.append(name)
    return layers
