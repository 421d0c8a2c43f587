"""fuse()'s pass for conv -> BN -> act containers: an nn.Sequential(Conv2d, BatchNorm2d, act) becomes a
ConvBNAct holding the same modules when its conv is an image stem (at most 4 input channels, a k x
k kernel) or a 1x1 convolution of any width (the expand conv of inverted residuals), so its eager
CPU inference runs a native kernel (both measured several times faster than PyTorch's conv + BN +
act: docs/performance.md). The state_dict keys do not change (ConvBNAct is an nn.Sequential with
the same children); inside a traced owner (a GraphModule fuse() made of a block with a residual add)
the three calls of such a container's children become one call of it. Containers that override
forward (whatever they compute is theirs) and other k x k convolutions (grouped, or over more
channels) are left to PyTorch."""
from __future__ import annotations

from typing import List

from torch import fx, nn

from .conv_bn_act import ConvBNAct
from ..cpu.prepared_dense_conv import eligible

#: The widest input a stem may have (RGB, RGBA).
STEM_MAX_IN_CHANNELS = 4


def is_conv_bn_act(module: nn.Module) -> bool:
    if not isinstance(module, nn.Sequential) or isinstance(module, ConvBNAct) \
            or type(module).forward is not nn.Sequential.forward or len(module) != 3:
        return False
    conv, bn, act = module
    if not isinstance(conv, nn.Conv2d):
        return False
    if tuple(conv.kernel_size) != (1, 1) and conv.in_channels > STEM_MAX_IN_CHANNELS:
        return False
    return eligible(conv, bn, act) is None


def convert_conv_bn_acts(model: nn.Module, found: List[str]) -> nn.Module:
    """Replaces every such container in `model` (or `model` itself) by a ConvBNAct; appends their
    paths to `found`."""
    def as_block(seq: nn.Sequential) -> ConvBNAct:
        block = ConvBNAct.from_modules(*seq)
        block.training = seq.training
        return block

    def visit(module: nn.Module, path: str) -> None:
        if isinstance(module, fx.GraphModule):
            _convert_in_graph(module, path, found, as_block)
            return
        for name, child in list(module.named_children()):
            child_path = f"{path}.{name}" if path else name
            if is_conv_bn_act(child):
                found.append(child_path)
                setattr(module, name, as_block(child))
            else:
                visit(child, child_path)

    if is_conv_bn_act(model):
        found.append("")
        return as_block(model)
    visit(model, "")
    return model


def _convert_in_graph(gm: fx.GraphModule, path: str, found: List[str], as_block) -> None:
    """In a traced owner (a GraphModule fuse() made), the graph calls a container's conv, BN and act
    one by one: where such a run calls exactly the three children of one convertible container, in
    order, each feeding only the next, the container becomes a ConvBNAct and the run one call of it."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or "." not in node.target:
            continue
        parent, _ = node.target.rsplit(".", 1)
        try:
            container = gm.get_submodule(parent)
        except AttributeError:
            continue
        if not is_conv_bn_act(container):
            continue
        names = [f"{parent}.{n}" for n, _ in container.named_children()]
        run = [node]
        while len(run) < 3 and len(run[-1].users) == 1:
            nxt = next(iter(run[-1].users))
            if nxt.op != "call_module" or nxt.target != names[len(run)] or nxt.args != (run[-1],) or nxt.kwargs:
                break
            run.append(nxt)
        if [n.target for n in run] != names or len(node.args) != 1 or node.kwargs:
            continue
        with gm.graph.inserting_after(run[-1]):
            call = gm.graph.call_module(parent, (node.args[0],))
        run[-1].replace_all_uses_with(call)
        for n in reversed(run):
            gm.graph.erase_node(n)
        owner, _, attr = parent.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, attr, as_block(container))
        found.append(f"{path}.{parent}" if path else parent)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
