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

#: "chain": shapes.BENCHMARK_BLOCKS back to back (32 x 112 x 112 input); the others are
#: lwkernels.models at 224 input with 10 classes (as `lwkernels bench --model`).
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
    elif name in WORKLOADS:
        torch.manual_seed(seed)
        fused = randomize_batchnorm(build_model(name, num_classes=10), seed).eval()
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"unknown workload {name!r}; choose one of {WORKLOADS}")
    return Workload(name, fused, to_reference(fused).eval(), x, _layers(fused))


def _layers(model: nn.Module) -> List[str]:
    """Top-level children in order, with Sequentials of blocks (``features``) split into their blocks."""
    layers = []
    for name, child in model.named_children():
        if name == "features" and isinstance(child, nn.Sequential):
            layers += [f"features.{k}" for k, _ in child.named_children()]
        elif not isinstance(child, (nn.Dropout, nn.Identity)):
            layers.append(name)
    return layers
