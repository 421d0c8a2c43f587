"""fuse(): turn the depthwise-separable chains of an existing model into JointBlocks; to_reference():
the inverse, every JointBlock back to plain PyTorch modules.

    from lwkernels import fuse
    model, report = fuse(model)          # a fused deep copy; the original is untouched
    print(report)                        # what was fused, the near-misses with the reason

fuse() traces the model with torch.fx and follows the data flow (fuse_graph.py), so chains wired in
a forward() (timm's DepthwiseSeparableConv and InvertedResidual, hand-written blocks) are found as
well as chains of nn.Sequential children:

    depthwise Conv2d -> [norm] -> [act] -> 1x1 Conv2d -> norm -> [act | + residual -> [act]]

It changes the model as little as possible (fuse_apply.py): the depthwise conv's slot gets a
JointBlock sharing the chain's modules and the other slots become nn.Identity; where the chain
includes an op written in a forward() (a functional activation, the residual add) or a module
called at several places, the smallest module whose forward issues the chain is replaced by a
torch.fx GraphModule of itself in which the chain is one JointBlock call. A model (or submodule)
torch.fx cannot trace is searched child by child, nn.Sequential containers with the Sequential
matcher (fuse_sequential.py); the report lists those fallbacks. docs/fuse.md has the details: what
is found and skipped, the state_dict after fuse(), and export.
"""
from __future__ import annotations

import collections
import copy
from typing import Tuple

import torch
from torch import nn

from .block import JointBlock
from .chain import JointChain
from .conv_bn_act import ConvBNAct
from .fuse_apply import GraphFusion, join
from .fuse_graph import trace, trace_in_mode
from .fuse_report import FusedChain, FuseReport, SkippedChain, TraceFallback
from .fuse_sequential import SequentialMatcher, is_transparent
from .fuse_conv_bn_act import convert_conv_bn_acts
from .fuse_inverted_residual import convert_inverted_residuals
from .fuse_head import install_classifier_forward, remove_classifier_forward
from .fuse_layouts import convert_layout_sequentials
from .inverted_residual import InvertedResidual, InvertedResidualReference
from .layout_sequential import LayoutSequential
from ..ops.reference import JointBlockReference


class _Fuser:
    def __init__(self) -> None:
        self.report = FuseReport()

    def convert_references(self, module: nn.Module, path: str) -> nn.Module:
        """Every JointBlockReference becomes a JointBlock sharing its modules."""
        if type(module) is JointBlockReference:
            return self._from_reference(module, path)
        for name, child in list(module.named_children()):
            new = self.convert_references(child, join(path, name))
            if new is not child:
                setattr(module, name, new)
        return module

    def _from_reference(self, ref: JointBlockReference, path: str) -> JointBlock:
        block = JointBlock.from_modules(ref.depthwise, ref.pointwise, ref.bn, ref.act, ref.mid_bn, ref.mid_act)
        block.training = ref.training
        roles = {"depthwise": ref.depthwise, "mid_bn": ref.mid_bn, "pointwise": ref.pointwise, "bn": ref.bn}
        self.report.fused.append(FusedChain(path, {r: join(path, r) for r, m in roles.items() if m is not None}))
        return block

    def fuse_module(self, module: nn.Module, path: str) -> nn.Module:
        """Fuse inside `module`; return what now stands in its place."""
        if isinstance(module, JointBlockReference):
            return module
        try:
            traced = trace(module)
            other = trace_in_mode(module, not module.training)
        except Exception as e:  # noqa: BLE001 - whatever torch.fx raises, look inside instead
            return self._fallback(module, path, e)
        return GraphFusion(self.report, module, path, traced, other, self.fuse_module).run()

    def _fallback(self, module: nn.Module, path: str, error: Exception) -> nn.Module:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = f"torch.fx cannot trace {type(module).__name__} ({type(error).__name__}: {message})"
        if is_transparent(module):
            self.report.fallbacks.append(TraceFallback(path, reason, "matched as an nn.Sequential"))
            SequentialMatcher(self.report, self.fuse_module).fuse_sequence(module, path)
            return module
        self.report.fallbacks.append(TraceFallback(path, reason, "its children are traced one by one"))
        for name, child in list(module.named_children()):
            new = self.fuse_module(child, join(path, name))
            if new is not child:
                setattr(module, name, new)
        return module


def fuse(model: nn.Module, inplace: bool = False) -> Tuple[nn.Module, FuseReport]:
    """Replace every fusable depthwise-separable chain of `model` by a JointBlock (see the module
    docstring and docs/fuse.md for the exact patterns); return ``(model, report)``.

    With ``inplace=False`` `model` is deep-copied first and left untouched. The JointBlocks share
    their parameters with the chain's modules (of the copy, or of `model` itself when inplace). The
    returned model is `model` (or its copy) unless the model itself had to be replaced by a traced
    GraphModule (a chain issued by the model's own forward)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        # Outside inference mode even when called inside it: tensors made there are inference
        # tensors, which have no version counter, so no fused call of the copy could be prepared
        # for replay (every call would fall back to the op or to PyTorch, several times slower).
        with torch.inference_mode(False):
            model = copy.deepcopy(model)
    order = {path: i for i, (path, _) in enumerate(model.named_modules(remove_duplicate=False))}
    fuser = _Fuser()
    model = fuser.convert_references(model, "")
    model = fuser.fuse_module(model, "")
    model = convert_conv_bn_acts(model, fuser.report)
    model = convert_inverted_residuals(model, fuser.report)
    model = convert_layout_sequentials(model, fuser.report.layout_sequentials)
    fuser.report.classifier_head = install_classifier_forward(model)
    fuser.report.inverted_residuals.sort(key=lambda p: order.get(p, len(order)))
    fuser.report.conv_bn_acts.sort(key=lambda p: order.get(p, len(order)))
    fuser.report.fused.sort(key=lambda c: order.get(c.path, len(order)))  # in the model's module order
    fuser.report.skipped.sort(key=lambda c: order.get(c.path, len(order)))
    return model, fuser.report


def to_reference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """`model` with every JointBlock replaced by a :class:`~lwkernels.JointBlockReference` — the plain
    PyTorch composition with the same modules (same parameters, buffers and training mode), so it
    computes the same function without the fused op — every JointChain and ConvBNAct by an
    nn.Sequential of its modules, every InvertedResidual by an InvertedResidualReference, and every
    LayoutSequential is an nn.Sequential again. Deep-copies `model` first unless `inplace`."""
    if not inplace:
        model = copy.deepcopy(model)

    def convert(block: JointBlock) -> JointBlockReference:
        ref = JointBlockReference(block.depthwise, block.pointwise, block.bn, block.act, block.mid_bn, block.mid_act)
        ref.training = block.training
        return ref

    def plain(chain: nn.Sequential) -> nn.Sequential:
        seq = nn.Sequential(collections.OrderedDict(
            (name, convert(m) if isinstance(m, JointBlock) else m) for name, m in chain.named_children()))
        seq.training = chain.training
        return seq

    def pair(ir: InvertedResidual) -> InvertedResidualReference:
        expand, block = ir[0], ir[1]
        ref = InvertedResidualReference(plain(expand), convert(block), ir.skip)
        ref.training = ir.training
        return ref

    for module in list(model.modules()):
        remove_classifier_forward(module)
        if isinstance(module, LayoutSequential):
            module.as_sequential()
    if isinstance(model, JointBlock):
        return convert(model)
    if isinstance(model, InvertedResidual):
        return pair(model)
    if isinstance(model, (JointChain, ConvBNAct)):
        return plain(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, InvertedResidual):
                setattr(module, name, pair(child))
            elif isinstance(child, JointBlock):
                setattr(module, name, convert(child))
            elif isinstance(child, (JointChain, ConvBNAct)):
                setattr(module, name, plain(child))
    return model


__all__ = ["FuseReport", "FusedChain", "SkippedChain", "TraceFallback", "fuse", "to_reference"]
