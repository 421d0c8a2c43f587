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

import collections
from typing import List

from torch import fx, nn

from .conv_bn_act import ConvBNAct
from ..cpu.prepared_dense_conv import eligible

#: The widest input a stem may have (RGB, RGBA).
STEM_MAX_IN_CHANNELS = 4


def _is_convertible(conv: nn.Module, bn: nn.Module, act: nn.Module) -> bool:
    """conv -> bn -> act that a ConvBNAct runs natively: an image stem or a 1x1 convolution."""
    if not isinstance(conv, nn.Conv2d):
        return False
    if tuple(conv.kernel_size) != (1, 1) and conv.in_channels > STEM_MAX_IN_CHANNELS:
        return False
    return eligible(conv, bn, act) is None


def is_conv_bn_act(module: nn.Module) -> bool:
    """A container that computes exactly conv -> bn -> act with a convertible trio."""
    if not isinstance(module, nn.Sequential) or isinstance(module, ConvBNAct) \
            or type(module).forward is not nn.Sequential.forward or len(module) != 3:
        return False
    return _is_convertible(*module)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _set(root: nn.Module, dotted: str, module: nn.Module) -> None:
    owner, _, attr = dotted.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, attr, module)


def _movable(trio, counts) -> bool:
    """Siblings may move into a ConvBNAct: each used once in the model and without forward hooks."""
    return all(counts[id(m)] == 1 and not (m._forward_hooks or m._forward_pre_hooks) for m in trio)


def _as_block(modules, training: bool) -> ConvBNAct:
    block = ConvBNAct.from_modules(*modules)
    block.training = training
    return block


def _block_of_siblings(trio, old_paths, new_path: str, report) -> ConvBNAct:
    """A ConvBNAct of three sibling modules that will sit at `new_path`; records where they and
    their state_dict keys move."""
    for k, (old, m) in enumerate(zip(old_paths, trio)):
        report.conv_bn_act_moves[old] = f"{new_path}.{k}"
        for key in m.state_dict():
            report.moved_keys[f"{old}.{key}"] = f"{new_path}.{k}.{key}"
    return _as_block(trio, trio[0].training)


def convert_conv_bn_acts(model: nn.Module, report) -> nn.Module:
    """Replaces every such container in `model` (or `model` itself) by a ConvBNAct, and every run of
    conv, BN and act siblings in a flat container by a ConvBNAct in the conv's slot (nn.Identity in
    the other two); records them in `report` (conv_bn_acts, conv_bn_act_moves, moved_keys)."""
    counts = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))

    def visit(module: nn.Module, path: str) -> None:
        if isinstance(module, fx.GraphModule):
            _convert_in_graph(module, path, report, counts)
            return
        for name, child in list(module.named_children()):
            if is_conv_bn_act(child):
                report.conv_bn_acts.append(_join(path, name))
                setattr(module, name, _as_block(list(child), child.training))
            else:
                visit(child, _join(path, name))
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            convert_runs(module, path)

    def convert_runs(seq: nn.Sequential, path: str) -> None:
        names = [n for n, _ in seq.named_children()]
        i = 0
        while i + 3 <= len(names):
            trio = [seq._modules[n] for n in names[i:i + 3]]
            if not (_movable(trio, counts) and _is_convertible(*trio)):
                i += 1
                continue
            new_path = _join(path, names[i])
            block = _block_of_siblings(trio, [_join(path, n) for n in names[i:i + 3]], new_path, report)
            setattr(seq, names[i], block)
            setattr(seq, names[i + 1], nn.Identity())
            setattr(seq, names[i + 2], nn.Identity())
            report.conv_bn_acts.append(new_path)
            i += 3

    if is_conv_bn_act(model):
        report.conv_bn_acts.append("")
        return _as_block(list(model), model.training)
    visit(model, "")
    return model


def _convert_in_graph(gm: fx.GraphModule, path: str, report, counts) -> None:
    """In a traced owner (a GraphModule fuse() made), the graph calls conv, BN and act one by one.
    Where three call_module nodes, each feeding only the next, call a convertible conv, BN and act:
    if they are exactly one container's children, that container becomes a ConvBNAct; otherwise
    (siblings in a flat container) a ConvBNAct of the three takes the conv's slot and the other two
    slots hold nn.Identity. Either way the graph calls the ConvBNAct once."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        run = [node]
        while len(run) < 3 and len(run[-1].users) == 1:
            nxt = next(iter(run[-1].users))
            if nxt.op != "call_module" or nxt.args != (run[-1],) or nxt.kwargs:
                break
            run.append(nxt)
        if len(run) != 3:
            continue
        try:
            trio = [gm.get_submodule(n.target) for n in run]
        except AttributeError:
            continue
        if not (_movable(trio, counts) and _is_convertible(*trio)):
            continue
        parent = run[0].target.rpartition(".")[0]
        container = gm.get_submodule(parent) if parent else gm
        if parent and is_conv_bn_act(container) and [n.target for n in run] == \
                [f"{parent}.{n}" for n, _ in container.named_children()]:
            target, block = parent, _as_block(trio, container.training)
        else:
            target = run[0].target
            block = _block_of_siblings(trio, [_join(path, n.target) for n in run], _join(path, target), report)
            for n in run[1:]:
                _set(gm, n.target, nn.Identity())
        with gm.graph.inserting_after(run[-1]):
            call = gm.graph.call_module(target, (node.args[0],))
        run[-1].replace_all_uses_with(call)
        for n in reversed(run):
            gm.graph.erase_node(n)
        _set(gm, target, block)
        report.conv_bn_acts.append(_join(path, target))
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
