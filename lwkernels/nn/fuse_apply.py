"""Applying the chains found in one traced module, changing the module as little as possible.

- Swap: when every op of the chain is a call of a module that is called once and registered at one
  path, the depthwise conv's slot gets a JointBlock sharing the chain's modules and the other
  slots get nn.Identity; the parents' forward() run unchanged.
- Owner: when the chain includes what a forward() does itself (a functional activation, the
  residual add) or a module called at several places (a shared ``self.relu``), the smallest module
  whose forward issues the whole chain (the owner) is replaced by a torch.fx GraphModule of just
  that module, in which the chain's ops are one call of the JointBlock (with the residual as its
  second argument). The GraphModule keeps the owner's children, parameters and buffers under the
  same names; everything outside the owner is untouched.
"""
from __future__ import annotations

import inspect
from collections import Counter, defaultdict
from typing import Callable, Dict, List, Optional

from torch import fx, nn

from .block import JointBlock
from ..ops.reference import JointBlockReference
from .fuse_graph import Chain, ChainMatcher, Traced, block_arguments, describe, owner_candidates, trace, \
    trace_in_mode
from .fuse_patterns import has_hooks
from .fuse_report import FusedChain, FuseReport, SkippedChain

_STATEFUL_ROLES = ("depthwise", "mid_bn", "pointwise", "bn")


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def takes_one_argument(m: nn.Module) -> bool:
    """forward(x) only: a GraphModule traced with one placeholder replays every call of it."""
    params = list(inspect.signature(m.forward).parameters.values())
    return len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                    inspect.Parameter.POSITIONAL_OR_KEYWORD)


class GraphFusion:
    """Fuses the chains of `module` (at `path` in the user's model) from its trace in its current
    mode (`traced`) and in the other mode (`other`)."""

    def __init__(self, report: FuseReport, module: nn.Module, path: str, traced: Traced, other: Traced,
                 fuse_inside: Callable[[nn.Module, str], nn.Module]) -> None:
        self.report, self.module, self.path = report, module, path
        self.fuse_inside = fuse_inside  # fuse() on a module the trace kept whole (one with hooks)
        self.traced, self.other = traced, other
        graph = traced.graph
        self.call_counts = Counter(n.target for n in graph.nodes if n.op == "call_module")
        self.attr_reads = [n.target for n in graph.nodes if n.op == "get_attr"]
        self.paths: Dict[int, List[str]] = defaultdict(list)
        for p, m in module.named_modules(remove_duplicate=False):
            self.paths[id(m)].append(p)

    def skip(self, target: str, reason: str) -> None:
        self.report.skipped.append(SkippedChain(join(self.path, target), reason))

    # -- deciding ----------------------------------------------------------------------------------
    def sharing_problem(self, chain: Chain) -> Optional[str]:
        for role in _STATEFUL_ROLES:
            node = chain.roles.get(role)
            if node is None:
                continue
            target, m = node.target, chain.modules[role]
            if self.call_counts[target] > 1:
                return f"{target} is called {self.call_counts[target]} times: a module used twice cannot be fused"
            if len(self.paths[id(m)]) > 1:
                return f"{target} is registered at several paths ({', '.join(self.paths[id(m)])})"
            read = [a for a in self.attr_reads if a.startswith(target + ".")]
            if read:
                return f"forward() reads {read[0]} directly"
        return None

    def used_once(self, node: fx.Node) -> bool:
        m = self.module.get_submodule(node.target)
        return self.call_counts[node.target] == 1 and len(self.paths[id(m)]) == 1

    def swappable(self, chain: Chain) -> bool:
        return chain.residual is None and all(
            n.op == "call_module" and self.used_once(n) for n in chain.roles.values())

    def pick_owner(self, chain: Chain) -> Optional[str]:
        for candidate in owner_candidates(chain):
            if candidate == "":  # the traced module itself: its hooks would not survive the replacement
                return None if has_hooks(self.module) else ""
            m = self.module.get_submodule(candidate)
            if takes_one_argument(m) and len(self.paths[id(m)]) == 1 and not has_hooks(m):
                return candidate
        return None

    # -- running -----------------------------------------------------------------------------------
    def run(self) -> nn.Module:
        matcher = ChainMatcher(self.module, self.traced.graph)
        other_matcher = ChainMatcher(self.module, self.other.graph)
        other_signatures = {}
        for node in other_matcher.starts():
            found = other_matcher.match(node)
            if isinstance(found, Chain):
                other_signatures[node.target] = found.signature()
        owned: Dict[str, List[str]] = defaultdict(list)
        for dw in matcher.starts():
            found = matcher.match(dw)
            if isinstance(found, str):
                self.skip(dw.target, found)
                continue
            if other_signatures.get(dw.target) != found.signature():
                self.skip(dw.target, "the chain differs between training and eval mode (forward() branches on "
                                     "self.training)")
                continue
            problem = self.sharing_problem(found)
            if problem:
                self.skip(dw.target, problem)
                continue
            if self.swappable(found):
                self.swap(found)
                continue
            owner = self.pick_owner(found)
            if owner is None:
                self.skip(dw.target, "no module containing the chain can be replaced by its trace (forward() "
                                     "takes more than x, or hooks)")
                continue
            owned[owner].append(dw.target)
        self.fuse_hooked_leaves()
        module = self.module
        kept: Dict[str, List[str]] = {}
        for owner in sorted(owned, key=len):  # an owner inside another one is covered by the outer trace
            outer = next((k for k in kept if k == "" or owner.startswith(k + ".")), None)
            kept.setdefault(outer if outer is not None else owner, []).extend(owned[owner])
        for owner, targets in kept.items():
            replacement = self.replace_owner(owner, targets)
            if replacement is not None and owner == "":
                module = replacement
        return module

    def fuse_hooked_leaves(self) -> None:
        """Modules with hooks are leaves of the trace (their hooks must keep firing), so chains inside
        them are searched with a trace of their own; the hooked module itself stays."""
        seen = set()
        for node in list(self.traced.graph.nodes):
            if node.op != "call_module" or node.target in seen:
                continue
            seen.add(node.target)
            m = self.module.get_submodule(node.target)
            if has_hooks(m) and next(m.children(), None) is not None and not isinstance(m, JointBlockReference):
                new = self.fuse_inside(m, join(self.path, node.target))
                if new is not m:
                    set_submodule(self.module, node.target, new)

    # -- applying ------------------------------------------------------------------------------------
    def key_map(self, chain: Chain, dw_path: str, prefix: str = "") -> Dict[str, str]:
        out = {}
        for role, m in chain.modules.items():
            module_path = join(self.path, join(prefix, chain.roles[role].target))
            for key in m.state_dict():
                out[join(module_path, key)] = join(dw_path, f"{role}.{key}")
        return out

    def record(self, chain: Chain, prefix: str, owner: Optional[str]) -> None:
        dw_path = join(self.path, join(prefix, chain.depthwise.target))
        modules = {}
        for role, node in chain.roles.items():
            if node.op == "call_module":
                modules[role] = join(self.path, join(prefix, node.target))
            else:
                modules[role] = f"{describe(node, {})} in {join(self.path, owner) or 'the model'}.forward"
        self.report.fused.append(FusedChain(dw_path, modules, self.key_map(chain, dw_path, prefix),
                                            owner=None if owner is None else join(self.path, owner)))

    def new_block(self, chain: Chain) -> JointBlock:
        block = JointBlock.from_modules(*block_arguments(chain))
        block.training = chain.modules["depthwise"].training
        return block

    def clear_slots(self, root: nn.Module, chain: Chain, prefix: str) -> None:
        """The chain's other modules leave the tree (nn.Identity in their slot) unless they are also
        called elsewhere (a shared activation); an output norm whose own activation stays outside
        the block leaves that activation in its slot."""
        for role, node in chain.roles.items():
            if role == "depthwise" or node.op != "call_module":
                continue
            m = chain.modules[role]
            if self.call_counts[join(prefix, node.target)] != 1 or len(self.paths[id(m)]) != 1:
                continue
            keep = chain.modules[role].act if role == "bn" and chain.act_outside else nn.Identity()
            set_submodule(root, node.target, keep)

    def swap(self, chain: Chain) -> None:
        self.record(chain, "", None)
        set_submodule(self.module, chain.depthwise.target, self.new_block(chain))
        self.clear_slots(self.module, chain, "")

    def replace_owner(self, owner_path: str, targets: List[str]) -> Optional[nn.Module]:
        """Replace the owner by a GraphModule in which the chains starting at `targets` are JointBlock
        calls; return the GraphModule (None when nothing was replaced: the chains are reported)."""
        owner = self.module.get_submodule(owner_path) if owner_path else self.module
        where = join(self.path, owner_path) or "the model"
        try:
            traced, other = trace(owner), trace_in_mode(owner, not owner.training)
        except Exception as e:  # noqa: BLE001 - any tracing failure is a reason to leave the owner alone
            for t in targets:
                self.skip(t, f"{where} ({type(owner).__name__}) cannot be traced alone: {type(e).__name__}: {e}")
            return None
        if traced.graph.python_code("self").src != other.graph.python_code("self").src:
            for t in targets:
                self.skip(t, f"forward() of {where} ({type(owner).__name__}) depends on the training mode: a traced "
                             "copy would fix one mode")
            return None
        matcher = ChainMatcher(owner, traced.graph)
        chains = {}
        for node in matcher.starts():
            found = matcher.match(node)
            if isinstance(found, Chain) and join(owner_path, node.target) in targets:
                chains[join(owner_path, node.target)] = found
        for t in targets:
            if t not in chains:
                self.skip(t, f"the chain is not found again when tracing {where} alone")
        if not chains:
            return None

        gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name=type(owner).__name__)
        for name, child in owner._modules.items():
            gm._modules[name] = child
        for name, p in owner._parameters.items():
            gm.register_parameter(name, p)
        for name, b in owner._buffers.items():
            gm.register_buffer(name, b, persistent=name not in owner._non_persistent_buffers_set)
        for name, t in traced.constants.items():
            setattr(gm, name, t)
        graph = traced.graph
        for full_target in targets:
            chain = chains.get(full_target)
            if chain is None:
                continue
            self.record(chain, owner_path, owner_path)
            dw_target = chain.depthwise.target
            block = self.new_block(chain)
            last = chain.output
            with graph.inserting_before(last):
                args = (chain.depthwise.args[0],) + ((chain.residual,) if chain.residual is not None else ())
                out = graph.call_module(dw_target, args)
                if chain.act_outside:
                    out = graph.call_module(chain.roles["bn"].target, (out,))
            last.replace_all_uses_with(out)
            for node in reversed(chain.nodes):
                graph.erase_node(node)
            set_submodule(gm, dw_target, block)
            self.clear_slots(gm, chain, owner_path)
        gm.graph = graph
        gm.recompile()
        gm.training = owner.training
        if owner_path:
            set_submodule(self.module, owner_path, gm)
        return gm
