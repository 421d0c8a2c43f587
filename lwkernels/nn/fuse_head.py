"""fuse()'s last step: a model whose own forward is a classifier head after one body module gets a
ClassifierForward (nn/classifier_forward.py), which runs the head as a fused kernel call after the
body and, once the body replays as one native call, inside that call.

The model's forward is traced with torch.fx, every child a leaf, and must be exactly

    body(x) -> adaptive_avg_pool2d(., 1) | nn.AdaptiveAvgPool2d(1) child -> torch.flatten(., 1)
            |  .mean over H and W (keepdim=False)
            -> classifier child: nn.Linear, or nn.Sequential of [nn.Dropout | nn.Identity,] nn.Linear

each value used once, with the body a LayoutSequential (a container of fused blocks). That is how
torchvision writes MobileNetV2, MNASNet and EfficientNet. Anything else keeps its forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import fx, nn

from .classifier_forward import ClassifierForward, HeadPattern, classifier_parts, installed
from .fuse_graph import trace_graph
from .layout_sequential import LayoutSequential


class _ChildrenAsLeaves(fx.Tracer):
    """Traces only the model's own forward: every module it calls is one call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _child(model: nn.Module, node: fx.Node) -> Optional[nn.Module]:
    if node.op != "call_module" or "." in node.target:
        return None
    return model._modules.get(node.target)


def _pools_to_one(size) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and tuple(size) == (1, 1))


def _mean_over_pixels(node: fx.Node) -> Optional[tuple]:
    """The arguments after the input of a mean over dims 2 and 3 without keepdim, else None."""
    is_mean = (node.op == "call_method" and node.target == "mean") or \
        (node.op == "call_function" and node.target is torch.mean)
    if not is_mean or set(node.kwargs) - {"dim", "keepdim"} or node.kwargs.get("keepdim", False):
        return None
    args = node.args[1:]
    if len(args) > 2 or (len(args) == 2 and args[1] is not False):
        return None
    dims = args[0] if args else node.kwargs.get("dim")
    if not isinstance(dims, (list, tuple)) or sorted(d % 4 for d in dims if isinstance(d, int)) != [2, 3] \
            or len(dims) != 2:
        return None
    return (list(dims),)


def _is_flatten(node: fx.Node) -> bool:
    if node.kwargs:
        return False
    if node.op == "call_function" and node.target is torch.flatten:
        return node.args[1:] in ((1,), (1, -1))
    return node.op == "call_method" and node.target == "flatten" and node.args[1:] in ((1,), (1, -1))


def match_head(model: nn.Module) -> Optional[HeadPattern]:
    """The pattern of `model`'s forward (see the module docstring), or None."""
    try:
        graph = trace_graph(_ChildrenAsLeaves(), model)
    except Exception:  # noqa: BLE001 - a forward torch.fx cannot trace is not this pattern
        return None
    nodes = list(graph.nodes)
    if len(nodes) < 5 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    if any(len(n.users) != 1 for n in nodes[:-1]) or any(n.op in ("placeholder", "get_attr") for n in nodes[1:]):
        return None
    body_node, pool_node, *rest = nodes[1:-1]
    if _child(model, body_node) is None or body_node.args != (nodes[0],) or body_node.kwargs:
        return None
    if pool_node.args[:1] != (body_node,):
        return None
    mean_args = _mean_over_pixels(pool_node)
    if mean_args is not None:
        pool, pool_args = "mean", mean_args
    elif pool_node.op == "call_function" and pool_node.target is nn.functional.adaptive_avg_pool2d \
            and len(pool_node.args) == 2 and not pool_node.kwargs and _pools_to_one(pool_node.args[1]):
        pool, pool_args = "adaptive_avg_pool2d", (pool_node.args[1],)
    elif type(_child(model, pool_node)) is nn.AdaptiveAvgPool2d and len(pool_node.args) == 1 \
            and _pools_to_one(model._modules[pool_node.target].output_size):
        pool, pool_args = pool_node.target, ()
    else:
        return None
    if pool != "mean":  # (a 4-D pooled map is flattened before the classifier)
        if not rest or not _is_flatten(rest[0]) or rest[0].args[0] is not pool_node:
            return None
        pool_node, rest = rest[0], rest[1:]
    if len(rest) != 1 or classifier_parts(_child(model, rest[0])) is None or rest[0].args != (pool_node,) \
            or rest[0].kwargs or nodes[-1].args != (rest[0],):
        return None
    return HeadPattern(body_node.target, pool, rest[0].target, pool_args)


def install_classifier_forward(model: nn.Module) -> Optional[HeadPattern]:
    """Gives `model` a ClassifierForward when its forward has the pattern and its body is a
    LayoutSequential; returns the pattern, or None (nothing changed)."""
    if "forward" in model.__dict__ or isinstance(model, nn.Sequential):
        return None  # (a forward of its own already; a container's forward is its members)
    pattern = match_head(model)
    if pattern is None or type(model._modules.get(pattern.body)) is not LayoutSequential:
        return None
    model.forward = ClassifierForward(model, pattern).forward
    return pattern


def remove_classifier_forward(model: nn.Module) -> None:
    """Takes a ClassifierForward off `model` (to_reference())."""
    if installed(model) is not None:
        del model.__dict__["forward"]


__all__ = ["install_classifier_forward", "match_head", "remove_classifier_forward"]
