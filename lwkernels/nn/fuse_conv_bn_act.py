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


def _convertible_run(conv: nn.Module, bn: nn.Module, act: nn.Module) -> bool:
    """Three sibling modules that is_conv_bn_act would accept as a container's children."""
    return is_conv_bn_act(nn.Sequential(conv, bn, act))


def convert_conv_bn_acts(model: nn.Module, report) -> nn.Module:
    """Replaces every such container in `model` (or `model` itself) by a ConvBNAct, and every run of
    conv, BN and act siblings in a flat container by a ConvBNAct in the conv's slot (nn.Identity in
    the other two); records them in `report` (conv_bn_acts, conv_bn_act_moves, moved_keys)."""
    found = report.conv_bn_acts
    counts = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    def as_block(seq: nn.Sequential) -> ConvBNAct:
        block = ConvBNAct.from_modules(*seq)
        block.training = seq.training
        return block

    def visit(module: nn.Module, path: str) -> None:
        if isinstance(module, fx.GraphModule):
            _convert_in_graph(module, path, report, counts, as_block)
            return
        for name, child in list(module.named_children()):
            child_path = f"{path}.{name}" if path else name
            if is_conv_bn_act(child):
                found.append(child_path)
                setattr(module, name, as_block(child))
            else:
                visit(child, child_path)
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            convert_runs(module, path)

    def convert_runs(seq: nn.Sequential, path: str) -> None:
        names = [n for n, _ in seq.named_children()]
        i = 0
        while i + 3 <= len(names):
            trio = [seq._modules[n] for n in names[i:i + 3]]
            alone = all(counts[id(m)] == 1 and not (m._forward_hooks or m._forward_pre_hooks) for m in trio)
            if alone and _convertible_run(*trio):
                join = (lambda n: f"{path}.{n}" if path else n)
                new_path = join(names[i])
                for k, (old_name, m) in enumerate(zip(names[i:i + 3], trio)):
                    report.conv_bn_act_moves[join(old_name)] = f"{new_path}.{k}"
                    for key in m.state_dict():
                        report.moved_keys[f"{join(old_name)}.{key}"] = f"{new_path}.{k}.{key}"
                block = ConvBNAct.from_modules(*trio)
                block.training = trio[0].training
                setattr(seq, names[i], block)
                setattr(seq, names[i + 1], nn.Identity())
                setattr(seq, names[i + 2], nn.Identity())
                found.append(new_path)
                i += 3
            else:
                i += 1

    if is_conv_bn_act(model):
        found.append("")
        return as_block(model)
    visit(model, "")
    return model


def _convert_in_graph(gm: fx.GraphModule, path: str, report, counts, as_block) -> None:
    """In a traced owner (a GraphModule fuse() made), the graph calls conv, BN and act one by one.
    Where three call_module nodes, each feeding only the next, call a convertible conv, BN and act:
    if they are exactly one container's children, that container becomes a ConvBNAct; otherwise
    (siblings in a flat container) a ConvBNAct of the three takes the conv's slot and the other two
    slots hold nn.Identity. Either way the graph calls the ConvBNAct once."""
    join = (lambda p: f"{path}.{p}" if path else p)
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
        if not _convertible_run(*trio) or any(counts[id(m)] != 1 or m._forward_hooks or m._forward_pre_hooks
                                              for m in trio):
            continue
        parent = run[0].target.rpartition(".")[0]
        container = gm.get_submodule(parent) if parent else gm
        if parent and is_conv_bn_act(container) and [n.target for n in run] == \
                [f"{parent}.{n}" for n, _ in container.named_children()]:
            target, block = parent, as_block(container)
        else:
            target, block = run[0].target, ConvBNAct.from_modules(*trio)
            block.training = trio[0].training
            for k, (n, m) in enumerate(zip(run, trio)):
                report.conv_bn_act_moves[join(n.target)] = join(f"{target}.{k}")
                for key in m.state_dict():
                    report.moved_keys[join(f"{n.target}.{key}")] = join(f"{target}.{k}.{key}")
            for n in run[1:]:
                owner, _, attr = n.target.rpartition(".")
                setattr(gm.get_submodule(owner) if owner else gm, attr, nn.Identity())
        with gm.graph.inserting_after(run[-1]):
            call = gm.graph.call_module(target, (node.args[0],))
        run[-1].replace_all_uses_with(call)
        for n in reversed(run):
            gm.graph.erase_node(n)
        owner, _, attr = target.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, attr, block)
        report.conv_bn_acts.append(join(target))
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
