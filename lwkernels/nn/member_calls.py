"""Which members of a LayoutSequential do nothing but call lwkernels' fused modules, and in what
order, so that its replay (cpu/prepared_sequence.py) may run their prepared kernels directly,
without the Python of every module call in between.

Only forwards whose behaviour is known qualify:
  - a fused module itself (InvertedResidual, JointBlock, ConvBNAct; exactly these classes),
  - nn.Identity,
  - an nn.Sequential, or a subclass that keeps its forward (torchvision's Conv2dNormActivation), of
    qualifying modules,
  - a torch.fx GraphModule (what fuse() makes of a block with a residual add) whose code is a
    straight line of submodule calls, each given the previous value, or a fused block given the
    previous value twice (as its input and its residual),
  - torchvision's MobileNetV2 and MNASNet inverted-residual modules without their residual add,
    whose forward then returns ``self.conv(x)`` / ``self.layers(x)``.
Anything else is called as a module. What the analysis relied on (each module's class, the
children its containers hold, no forward set on an instance, the wrappers' residual flags, a
GraphModule's generated forward), and that none of the modules has forward hooks, is watched;
the replay checks it on every call.
"""
from __future__ import annotations

import sys
from typing import List, NamedTuple, Optional, Tuple

from torch import fx, nn

from ..cpu.state_watch import StateWatch
from .block import JointBlock
from .conv_bn_act import ConvBNAct
from .inverted_residual import InvertedResidual

_FUSED = (InvertedResidual, JointBlock, ConvBNAct)

#: (module, class name, flag attribute, child): third-party blocks whose forward is
#: ``self.<child>(x) + x`` when the flag is true and ``self.<child>(x)`` when it is false.
_KNOWN_WRAPPERS = (
    ("torchvision.models.mobilenetv2", "InvertedResidual", "use_res_connect", "conv"),
    ("torchvision.models.mnasnet", "_InvertedResidual", "apply_residual", "layers"),
)


class FusedCall(NamedTuple):
    """One call of a fused module; `residual_is_input`: it gets its input as the residual too."""
    module: nn.Module
    residual_is_input: bool


class MemberCalls(NamedTuple):
    """The fused calls a member amounts to, in order, and what that depends on."""
    calls: Tuple[FusedCall, ...]
    watch: StateWatch  # classes, children, instance forwards, wrapper flags, empty hook dicts


def member_calls(member: nn.Module) -> Optional[MemberCalls]:
    """What `member`'s forward amounts to (see the module docstring); None when it is not known."""
    walk = _Walk()
    calls = walk.calls_of(member)
    if calls is None:
        return None
    return MemberCalls(tuple(calls), walk.watch)


class _Walk:
    def __init__(self) -> None:
        self.watch = StateWatch()

    def _visit(self, module: nn.Module) -> bool:
        """Watch `module`'s class and that no forward is set on it; False when something could
        change its forward unseen."""
        self.watch.watch_class(module)
        self._no_hooks(module)
        return self.watch.watch(module.__dict__, ("forward",))

    def _no_hooks(self, module: nn.Module) -> None:
        """`module`'s forward hooks must stay absent (the replay would not call them)."""
        self.watch.watch(module.__dict__, ("_forward_hooks", "_forward_pre_hooks"))
        self.watch.watch_empty(module._forward_hooks)
        self.watch.watch_empty(module._forward_pre_hooks)

    def calls_of(self, module: nn.Module) -> Optional[List[FusedCall]]:
        if not self._visit(module):
            return None
        kind = type(module)
        if kind in _FUSED:
            return [self._fused_call(module, False)]
        if isinstance(module, fx.GraphModule):
            return self._graph_calls(module)
        if kind.__call__ is not nn.Module.__call__:
            return None
        if isinstance(module, nn.Identity) and kind.forward is nn.Identity.forward:
            return []
        if isinstance(module, nn.Sequential) and kind.forward is nn.Sequential.forward:
            return self._children_calls(module, list(module._modules))
        wrapper = _known_wrapper(module)
        if wrapper is not None:
            flag, child = wrapper
            self.watch.watch(module.__dict__, (flag,))
            return self._children_calls(module, [child])
        return None

    def _fused_call(self, module: nn.Module, residual_is_input: bool) -> FusedCall:
        """A fused module's call. Before replaying its prepared call, its forward checks for hooks on
        the modules it would otherwise call (an InvertedResidual's two, its expand's three, a
        ConvBNAct's three; a JointBlock calls none); so does the replay, and it checks that the
        containers hold the same children."""
        inner = list(module.children())
        if type(module) is InvertedResidual:
            inner += list(inner[0].children())
        if type(module) is not JointBlock:
            for m in inner:
                self._no_hooks(m)
        for container in [module] + inner:
            if container._modules and type(container) in _FUSED:
                self.watch.watch(container._modules, list(container._modules))
        if type(module) is InvertedResidual:
            self.watch.watch(module.__dict__, ("skip",))
            residual_is_input = residual_is_input or module.skip
        return FusedCall(module, residual_is_input)

    def _children_calls(self, module: nn.Module, names: List[str]) -> Optional[List[FusedCall]]:
        self.watch.watch(module._modules, names)
        calls: List[FusedCall] = []
        for name in names:
            child = module._modules[name]
            found = None if child is None else self.calls_of(child)
            if found is None:
                return None
            calls += found
        return calls

    def _graph_calls(self, gm: fx.GraphModule) -> Optional[List[FusedCall]]:
        """The calls of a GraphModule whose graph is placeholder -> call_module ... -> output."""
        # The forward that runs is generated from the graph by recompile(): both must still agree.
        if gm.code != gm.graph.python_code("self").src:
            return None
        self.watch.watch(type(gm).__dict__, ("forward",))
        nodes = list(gm.graph.nodes)
        if len(nodes) < 2 or nodes[0].op != "placeholder" or nodes[-1].op != "output" \
                or nodes[0].args or nodes[-1].args != (nodes[-2],) or nodes[-1].kwargs:
            return None
        calls: List[FusedCall] = []
        previous = nodes[0]
        for node in nodes[1:-1]:
            if node.op != "call_module" or node.kwargs or node.args not in ((previous,), (previous, previous)):
                return None
            target = self._submodule(gm, node.target)
            if target is None:
                return None
            if len(node.args) == 2:  # a fused block given its input as the residual too
                if type(target) not in (InvertedResidual, JointBlock) or not self._visit(target):
                    return None
                calls.append(self._fused_call(target, True))
            else:
                found = self.calls_of(target)
                if found is None:
                    return None
                calls += found
            previous = node
        return calls

    def _submodule(self, root: nn.Module, target: str) -> Optional[nn.Module]:
        """root.get_submodule(target), watching every container on the way."""
        module = root
        for name in target.split("."):
            self.watch.watch(module._modules, (name,))
            module = module._modules.get(name)
            if module is None:
                return None
        return module


def _known_wrapper(module: nn.Module) -> Optional[Tuple[str, str]]:
    """(flag, child) of a known third-party block (_KNOWN_WRAPPERS) whose residual flag is off, which
    then returns its child's output unchanged; None for any other module."""
    kind = type(module)
    for module_name, class_name, flag, child in _KNOWN_WRAPPERS:
        source = sys.modules.get(module_name)
        known = getattr(source, class_name, None) if source is not None else None
        if known is not None and kind is known and module.__dict__.get(flag) is False:
            return flag, child
    return None
