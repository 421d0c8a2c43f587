"""The data-flow matcher of fuse(): trace a module with torch.fx, find the depthwise-separable chains
in the graph by following values (not the order of children), and tell whether each can be fused.

Convolutions, BatchNorm2d and all its subclasses, torch.nn modules (activations, dropout,
nn.Identity, ...), drop-path modules, JointBlock/JointBlockReference and every module with hooks
stay leaves of the trace (one ``call_module`` node); every other module's forward is inlined, so a
chain wired by hand in a forward() is as visible as one in an nn.Sequential.

A chain, from a depthwise conv node, every value in it used by the next step only:

    depthwise Conv2d -> [norm] -> [act] -> 1x1 Conv2d -> norm -> [act | + residual -> [act]]

with identities (nn.Identity, dropout / drop path with probability 0) allowed anywhere in between.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import fx, nn

from ..ops.activation import activation_module
from ..ops.reference import JointBlockReference
from .block import check_joint_modules
from .fuse_patterns import (depthwise_problem, dtype_problem, function_activation, has_hooks, is_add,
                            is_identity_module, is_mixed_depthwise, is_norm_module, method_activation,
                            module_activation, norm_activation, plain_batchnorm_sharing, pointwise_problem,
                            supported_activations)

# Leaves by class name: model-library modules whose forward must not be inlined (it is either an
# identity we recognise by its attributes, or something we report as a whole).
_LEAF_CLASS_NAMES = ("DropPath", "StochasticDepth", "MixedConv2d")


class ChainTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, JointBlockReference)) or has_hooks(m):
            return True
        if type(m).__name__ in _LEAF_CLASS_NAMES:
            return True
        return super().is_leaf_module(m, qualname)


def trace_graph(tracer: fx.Tracer, module: nn.Module) -> fx.Graph:
    """tracer.trace(module), leaving the tracer holding nothing. torch.fx's tracing leaves a
    reference cycle through the tracer (closures of its patched functions refer to it), which only
    the garbage collector frees; while the tracer held the module, fuse() kept the model it traced
    (and the fused model made from it, with its kernels' buffers) alive after the last user
    reference was gone."""
    try:
        return tracer.trace(module)
    finally:
        tracer.__dict__.clear()


@dataclass
class Traced:
    """A module's graph and the tensor constants the tracer had to attach to it."""

    graph: fx.Graph
    constants: Dict[str, torch.Tensor] = field(default_factory=dict)


def trace(module: nn.Module) -> Traced:
    """Trace `module` (raises what torch.fx raises for untraceable code). Tensor constants the tracer
    would leave on `module` as attributes are taken off again and returned."""
    before = set(module.__dict__)
    try:
        graph = trace_graph(ChainTracer(), module)
    finally:
        added = {name: module.__dict__.pop(name) for name in set(module.__dict__) - before}
    return Traced(graph, {k: v for k, v in added.items() if isinstance(v, torch.Tensor)})


@contextlib.contextmanager
def training_mode(module: nn.Module, mode: bool) -> Iterator[None]:
    """Every submodule in `mode`, then each back in its own mode."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(mode)
    try:
        yield
    finally:
        for m, was in saved:
            m.training = was


def trace_in_mode(module: nn.Module, mode: bool) -> Traced:
    with training_mode(module, mode):
        return trace(module)


@dataclass
class Chain:
    """A matched chain: the nodes a single JointBlock call replaces."""

    nodes: List[fx.Node]                         # every node replaced, in order (identities included)
    roles: Dict[str, fx.Node]                    # depthwise, mid_bn, mid_act, pointwise, bn, act, add
    modules: Dict[str, nn.Module]                # role -> module, for roles that are module calls
    mid_act: str = "none"
    act: str = "none"
    residual: Optional[fx.Node] = None
    act_outside: bool = False                    # the output norm's own activation stays after the block

    @property
    def depthwise(self) -> fx.Node:
        return self.roles["depthwise"]

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]

    def signature(self) -> Tuple:
        """What the chain computes, for comparing the chains of two traces."""
        return tuple((role, n.op, str(n.target)) for role, n in self.roles.items()) + \
            (self.residual is not None, self.act_outside, self.mid_act, self.act)


def describe(node: Optional[fx.Node], modules: Dict[str, nn.Module]) -> str:
    if node is None:
        return "nothing"
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the output"
    return f"{node.op} {node.target}"


def fed(cur: fx.Node, passed: List[fx.Node]) -> fx.Node:
    """The value the next op reads: `cur`, or the last identity it went through."""
    return passed[-1] if passed else cur


class ChainMatcher:
    """Finds the chains of one traced graph (`root` is the module that was traced)."""

    def __init__(self, root: nn.Module, graph: fx.Graph) -> None:
        self.graph = graph
        self.modules = dict(root.named_modules())

    def module(self, node: Optional[fx.Node]) -> Optional[nn.Module]:
        return self.modules.get(node.target) if node is not None and node.op == "call_module" else None

    def starts(self) -> List[fx.Node]:
        """Grouped-conv calls: the chains' possible starts (and the near-misses worth reporting)."""
        out = []
        for node in self.graph.nodes:
            m = self.module(node)
            if (isinstance(m, nn.Conv2d) and m.groups > 1) or (m is not None and is_mixed_depthwise(m)):
                out.append(node)
        return out

    def describe(self, node: Optional[fx.Node]) -> str:
        return describe(node, self.modules)

    # -- steps along the data flow -----------------------------------------------------------------
    def follow(self, cur: fx.Node) -> Tuple[Optional[fx.Node], List[fx.Node], Optional[str]]:
        """The one op consuming `cur`, past identity modules: (node, identities passed, None), or
        (None, [], why) when some value on the way has another number of users than one."""
        passed: List[fx.Node] = []
        while True:
            users = list(cur.users)
            if len(users) != 1:
                what = ", ".join(self.describe(u) for u in users) or "none"
                return None, [], (f"the value of {self.describe(cur)} has {len(users)} users ({what}), not only "
                                  "the next step of the chain (SE/attention, a branch or a second use)")
            user = users[0]
            m = self.module(user)
            if m is not None and is_identity_module(m) and user.args == (cur,) and not user.kwargs:
                passed.append(user)
                cur = user
                continue
            return user, passed, None

    def activation_of(self, node: fx.Node, cur: fx.Node) -> Optional[str]:
        """The activation `node` applies to `cur`, if it is a recognised activation call."""
        if not node.args or node.args[0] is not cur:
            return None
        if node.op == "call_module":
            return module_activation(self.modules[node.target]) if len(node.args) == 1 and not node.kwargs else None
        if node.op == "call_function":
            return function_activation(node.target, node.args, node.kwargs)
        if node.op == "call_method":
            return method_activation(node.target, node.args, node.kwargs)
        return None

    def norm_of(self, node: Optional[fx.Node], cur: fx.Node) -> Optional[nn.Module]:
        m = self.module(node)
        return m if m is not None and is_norm_module(m) and node.args == (cur,) and not node.kwargs else None

    # -- the chain ---------------------------------------------------------------------------------
    def match(self, dw: fx.Node) -> Union[Chain, str]:
        """The chain starting at the grouped conv `dw`, or the reason there is none."""
        m = self.modules[dw.target]
        if is_mixed_depthwise(m):
            return "MixedConv2d (several depthwise kernel sizes over channel splits) is not supported"
        problem = depthwise_problem(m)
        if problem:
            return problem
        supported = supported_activations()
        chain = Chain(nodes=[dw], roles={"depthwise": dw}, modules={"depthwise": m})

        def take(role: str, node: fx.Node, passed: List[fx.Node]) -> fx.Node:
            chain.nodes.extend(passed)
            chain.nodes.append(node)
            chain.roles[role] = node
            if node.op == "call_module":
                chain.modules[role] = self.modules[node.target]
            return node

        cur = dw
        nxt, passed, why = self.follow(cur)
        if nxt is None:
            return f"after the depthwise conv: {why}"
        mid_norm = self.norm_of(nxt, fed(cur, passed))
        norm_act_done = False
        if mid_norm is not None:
            carried, why = norm_activation(mid_norm)
            if why:
                return f"{why} at {nxt.target}"
            cur = take("mid_bn", nxt, passed)
            if carried is not None:
                name = module_activation(carried)
                if name is None:
                    return f"activation {type(carried).__name__} (in {nxt.target}) is not one fuse() recognises"
                if name not in supported:
                    return f"activation {name} (in {nxt.target}) is not supported by the op"
                chain.mid_act, norm_act_done = name, True
            nxt, passed, why = self.follow(cur)
            if nxt is None:
                return f"after {self.describe(cur)}: {why}"
        if not norm_act_done:
            name = self.activation_of(nxt, fed(cur, passed))
            if name is not None:
                if name not in supported:
                    return f"activation {name} ({self.describe(nxt)}) is not supported by the op"
                cur = take("mid_act", nxt, passed)
                chain.mid_act = name
                nxt, passed, why = self.follow(cur)
                if nxt is None:
                    return f"after {self.describe(cur)}: {why}"

        pw = self.module(nxt)
        if not isinstance(pw, nn.Conv2d) or nxt.args != (fed(cur, passed),) or nxt.kwargs:
            return f"depthwise conv is followed by {self.describe(nxt)}, not a 1x1 pointwise Conv2d"
        problem = pointwise_problem(pw)
        if problem:
            return f"the conv after the depthwise conv ({nxt.target}: {problem})"
        cur = take("pointwise", nxt, passed)

        nxt, passed, why = self.follow(cur)
        bn = self.norm_of(nxt, fed(cur, passed)) if nxt is not None else None
        if bn is None:
            if nxt is None:
                return f"after the pointwise conv: {why}"
            return f"pointwise conv is followed by {self.describe(nxt)}, not a BatchNorm2d"
        carried, why = norm_activation(bn)
        if why:
            return f"{why} at {nxt.target}"
        cur = take("bn", nxt, passed)
        if carried is not None and module_activation(carried) != "none":
            name = module_activation(carried)
            if name in supported:
                chain.act = name
            else:  # the block ends before the act; the norm's slot keeps the act (see apply)
                chain.act_outside = True
        else:
            self._tail(chain, cur, take, supported)
        return self._validate(chain)

    def _tail(self, chain: Chain, cur: fx.Node, take, supported) -> None:
        """The optional output act, or residual add and then optional act."""
        nxt, passed, _ = self.follow(cur)
        if nxt is None:
            return
        cur = fed(cur, passed)
        name = self.activation_of(nxt, cur)
        if name is not None:
            if name in supported:
                take("act", nxt, passed)
                chain.act = name
            return
        if is_add(nxt.op, nxt.target, nxt.args, nxt.kwargs) and cur in nxt.args:
            other = nxt.args[1] if nxt.args[0] is cur else nxt.args[0]
            if not isinstance(other, fx.Node) or other is cur or other.op == "get_attr":
                return
            cur = take("add", nxt, passed)
            chain.residual = other
            nxt, passed, _ = self.follow(cur)
            if nxt is not None:
                name = self.activation_of(nxt, fed(cur, passed))
                if name is not None and name in supported:
                    take("act", nxt, passed)
                    chain.act = name

    def _validate(self, chain: Chain) -> Union[Chain, str]:
        hooked = [self.roles_path(chain, role) for role, m in chain.modules.items() if has_hooks(m)]
        if hooked:
            return f"modules with hooks would stop firing: {', '.join(hooked)}"
        for role in ("mid_bn", "pointwise", "bn"):
            m = chain.modules.get(role)
            problem = dtype_problem(m) if m is not None else None
            if problem:
                return f"{problem} ({self.roles_path(chain, role)})"
        dtypes = {p.dtype for role in ("depthwise", "mid_bn", "pointwise", "bn") if role in chain.modules
                  for p in chain.modules[role].parameters(recurse=False)}
        if len(dtypes) > 1:
            return f"the chain's parameters have different dtypes {sorted(map(str, dtypes))}"
        try:
            check_joint_modules(*block_arguments(chain))
        except ValueError as e:
            return str(e)
        return chain

    @staticmethod
    def roles_path(chain: Chain, role: str) -> str:
        return str(chain.roles[role].target)


def block_arguments(chain: Chain):
    """(depthwise, pointwise, bn, act, mid_bn, mid_act) for JointBlock.from_modules: the chain's own
    conv modules, stock BatchNorm2d modules (a norm that applies its own activation is replaced by a
    plain one sharing its tensors) and fresh activation modules."""
    def plain(m: Optional[nn.Module]) -> Optional[nn.BatchNorm2d]:
        if m is None or type(m) is nn.BatchNorm2d:
            return m
        return plain_batchnorm_sharing(m)

    mods = chain.modules
    return (mods["depthwise"], mods["pointwise"], plain(mods["bn"]), activation_module(chain.act),
            plain(mods.get("mid_bn")), activation_module(chain.mid_act))


def owner_candidates(chain: Chain) -> List[str]:
    """Paths of the modules whose forward issues every op of the chain, innermost first (the root, "",
    always last)."""
    stacks = []
    for node in chain.nodes:
        stack = [entry[0] for entry in (node.meta.get("nn_module_stack") or {}).values()]
        if node.op == "call_module":
            stack = stack[:-1]  # the leaf module itself
        stacks.append(stack)
    common: List[str] = []
    for entries in zip(*stacks):
        if any(e != entries[0] for e in entries):
            break
        common.append(entries[0])
    return [p for p in reversed(common) if p] + [""]
