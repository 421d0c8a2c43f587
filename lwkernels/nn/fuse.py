"""fuse(): turn the depthwise-separable chains of an existing model into JointBlocks; to_reference():
the inverse, every JointBlock back to plain PyTorch modules.

    from lwkernels import fuse
    model, report = fuse(model)          # a fused deep copy; the original is untouched
    print(report)                        # what was fused, and the near-misses with the reason

What is fused: a chain of consecutive children of ``nn.Sequential`` containers

    depthwise Conv2d -> [BatchNorm2d] -> [ReLU | ReLU6] -> 1x1 Conv2d -> BatchNorm2d -> [ReLU | ReLU6]

where the depthwise conv has groups == in_channels == out_channels (any kernel size, stride,
padding, dilation; zero padding mode), the pointwise conv is 1x1 with stride 1, no padding, groups 1,
and either conv may have a bias. Nested Sequentials are looked through when their class does not
override ``forward`` and they carry no hooks (e.g. Conv2dNormActivation-style ``Sequential(conv, bn,
act)`` blocks inside a Sequential, or the ``conv`` Sequential of a MobileNet-V2 inverted residual), so
a chain may start in one nested block and end in the next. ``nn.Identity`` children in between are
ignored. Residual additions written in a module's ``forward`` stay where they are: only the chain
inside the Sequential is replaced. Chains wired in a custom ``forward`` (``self.bn(self.conv(x))``)
are not found: the order of a module's attributes does not say the order of calls. Existing
:class:`~lwkernels.JointBlockReference` modules become JointBlocks too.

How: the depthwise conv's slot in its container gets ``JointBlock.from_modules(...)``, which
*shares* (does not copy) the chain's Conv2d/BatchNorm2d modules and so their parameters and
buffers; the other slots of the chain become ``nn.Identity()``, so every other child keeps its
index and name. Consequences:

- Outputs are unchanged (in eval mode up to float rounding; the fused op folds BN).
- With ``inplace=False`` (default) the model is deep-copied first and the original is untouched;
  with ``inplace=True`` the JointBlocks share the original model's parameters: training either
  trains both.
- state_dict keys of fused chains change (``features.3.weight`` becomes
  ``features.3.depthwise.weight`` etc.; ``FusedChain.key_map`` lists old -> new); every other key and
  value is unchanged. Load checkpoints saved from the unfused model before fusing (or rename with
  ``FuseReport.key_map()``).
- Hooks registered on the fused modules would no longer fire, so chains containing a module with
  hooks are skipped (reported).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

from .block import JointBlock, check_joint_modules
from ..ops.reference import JointBlockReference


@dataclass(frozen=True)
class FusedChain:
    """One chain replaced by a JointBlock at ``path`` (the depthwise conv's old place).

    ``modules`` maps each role (depthwise, mid_bn, mid_act, pointwise, bn, act) to the path the
    module had; ``key_map`` maps old state_dict keys to the fused model's keys."""

    path: str
    modules: Dict[str, str]
    key_map: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.path}: " + " -> ".join(f"{role}={p}" for role, p in self.modules.items())


@dataclass(frozen=True)
class SkippedChain:
    """A near-miss: a grouped/depthwise conv (at ``path``) that starts no fusable chain, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class FuseReport:
    fused: List[FusedChain] = field(default_factory=list)
    skipped: List[SkippedChain] = field(default_factory=list)

    def key_map(self) -> Dict[str, str]:
        """Old state_dict key -> fused model's key, for every fused chain."""
        out: Dict[str, str] = {}
        for chain in self.fused:
            out.update(chain.key_map)
        return out

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} chain(s), skipped {len(self.skipped)} near-miss(es)"]
        lines += [f"  fused   {c}" for c in self.fused]
        lines += [f"  skipped {s}" for s in self.skipped]
        return "\n".join(lines)


# -- module classification ----------------------------------------------------------------------

def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None)
                or getattr(m, "_backward_pre_hooks", None))


def _stock(m: nn.Module, cls: type) -> bool:
    """An instance of `cls` whose forward is cls's own (a subclass overriding forward computes
    something else and must not be fused)."""
    return isinstance(m, cls) and type(m).forward is cls.forward


def _is_act(m: nn.Module) -> bool:
    return _stock(m, nn.ReLU) or _stock(m, nn.ReLU6)


def _is_bn(m: nn.Module) -> bool:
    return _stock(m, nn.BatchNorm2d)


def _is_transparent(m: nn.Module) -> bool:
    """A Sequential whose children run one after another with nothing in between."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward and not _has_hooks(m)


def _is_skippable(m: nn.Module) -> bool:
    return type(m) is nn.Identity and not _has_hooks(m)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Slot:
    """A child slot in a container: enough to read and replace it."""

    __slots__ = ("container", "name", "module", "path")

    def __init__(self, container: nn.Module, name: str, module: nn.Module, path: str) -> None:
        self.container, self.name, self.module, self.path = container, name, module, path

    def replace(self, new: nn.Module) -> None:
        setattr(self.container, self.name, new)


# -- the walk -----------------------------------------------------------------------------------

class _Fuser:
    def __init__(self) -> None:
        self.report = FuseReport()

    def visit(self, parent: Optional[nn.Module], name: str, module: nn.Module, path: str) -> nn.Module:
        """Fuse inside `module`; return what now stands in its place (itself, or a new JointBlock)."""
        if isinstance(module, JointBlock):
            return module
        if type(module) is JointBlockReference:
            block = self._from_reference(module, path)
            if parent is not None:
                setattr(parent, name, block)
            return block
        if _is_transparent(module):
            self.fuse_sequence(module, path)
            return module
        for child_name, child in list(module.named_children()):
            self.visit(module, child_name, child, _join(path, child_name))
        return module

    def _from_reference(self, ref: JointBlockReference, path: str) -> JointBlock:
        block = JointBlock.from_modules(ref.depthwise, ref.pointwise, ref.bn, ref.act, ref.mid_bn, ref.mid_act)
        block.training = ref.training
        roles = {"depthwise": ref.depthwise, "mid_bn": ref.mid_bn, "pointwise": ref.pointwise, "bn": ref.bn}
        self.report.fused.append(FusedChain(path, {r: _join(path, r) for r, m in roles.items() if m is not None}))
        return block

    def flatten(self, seq: nn.Sequential, path: str, out: List[_Slot]) -> List[_Slot]:
        for name, child in seq.named_children():
            child_path = _join(path, name)
            if _is_transparent(child):
                self.flatten(child, child_path, out)
            else:
                out.append(_Slot(seq, name, child, child_path))
        return out

    def fuse_sequence(self, seq: nn.Sequential, path: str) -> None:
        slots = self.flatten(seq, path, [])
        i = 0
        while i < len(slots):
            m = slots[i].module
            if isinstance(m, nn.Conv2d) and m.groups > 1:
                end = self.try_chain(slots, i)
                if end is not None:
                    i = end
                    continue
            i += 1
        # Recurse into what was not part of a chain (custom blocks with Sequentials inside, ...).
        for slot in slots:
            current = getattr(slot.container, slot.name)
            if current is slot.module:
                self.visit(slot.container, slot.name, current, slot.path)

    def try_chain(self, slots: List[_Slot], i: int) -> Optional[int]:
        """Fuse the chain starting at slots[i] if it is one; return the index after it, or None."""
        dw_slot = slots[i]
        dw = dw_slot.module
        chain: List[Tuple[str, _Slot]] = [("depthwise", dw_slot)]
        j = i + 1

        def next_slot() -> Optional[_Slot]:
            nonlocal j
            while j < len(slots) and _is_skippable(slots[j].module):
                j += 1
            return slots[j] if j < len(slots) else None

        def skip(reason: str) -> None:
            self.report.skipped.append(SkippedChain(dw_slot.path, reason))

        if dw.groups != dw.in_channels or dw.out_channels != dw.in_channels:
            kind = ("grouped conv" if dw.groups != dw.in_channels else "depthwise conv with a channel multiplier")
            skip(f"{kind} (in_channels={dw.in_channels}, out_channels={dw.out_channels}, groups={dw.groups}) "
                 "is not depthwise: needs groups == in_channels == out_channels")
            return None
        if not _stock(dw, nn.Conv2d):
            skip(f"{type(dw).__name__} overrides Conv2d.forward")
            return None
        for role, accept in (("mid_bn", _is_bn), ("mid_act", _is_act)):
            s = next_slot()
            if s is not None and accept(s.module):
                chain.append((role, s))
                j += 1
        s = next_slot()
        if s is None:
            skip("depthwise conv ends its Sequential; no 1x1 pointwise Conv2d follows")
            return None
        if not isinstance(s.module, nn.Conv2d):
            skip(f"depthwise conv is followed by {type(s.module).__name__} ({s.path}), not a 1x1 pointwise Conv2d")
            return None
        pw = s.module
        if pw.kernel_size != (1, 1) or pw.groups != 1 or pw.stride != (1, 1) or pw.padding != (0, 0):
            skip(f"the conv after the depthwise conv ({s.path}: kernel {tuple(pw.kernel_size)}, stride "
                 f"{tuple(pw.stride)}, padding {pw.padding}, groups {pw.groups}) is not a 1x1 pointwise conv")
            return None
        if not _stock(pw, nn.Conv2d):
            skip(f"{type(pw).__name__} at {s.path} overrides Conv2d.forward")
            return None
        chain.append(("pointwise", s))
        j += 1
        s = next_slot()
        if s is None or not _is_bn(s.module):
            what = "nothing" if s is None else f"{type(s.module).__name__} ({s.path})"
            skip(f"pointwise conv is followed by {what}, not a BatchNorm2d")
            return None
        chain.append(("bn", s))
        j += 1
        s = next_slot()
        if s is not None and _is_act(s.module) and not _has_hooks(s.module):  # a hooked act just stays
            chain.append(("act", s))
            j += 1

        hooked = [slot.path for _, slot in chain if _has_hooks(slot.module)]
        if hooked:
            skip(f"modules with hooks would stop firing: {', '.join(hooked)}")
            return None
        mods = {role: slot.module for role, slot in chain}
        try:
            check_joint_modules(mods["depthwise"], mods["pointwise"], mods["bn"], mods.get("act"),
                                mods.get("mid_bn"), mods.get("mid_act"))
        except ValueError as e:
            skip(str(e))
            return None

        block = JointBlock.from_modules(mods["depthwise"], mods["pointwise"], mods["bn"], mods.get("act"),
                                        mods.get("mid_bn"), mods.get("mid_act"))
        block.training = dw_slot.container.training
        dw_slot.replace(block)
        for _, slot in chain[1:]:
            slot.replace(nn.Identity())
        key_map = {}
        for role, slot in chain:
            for key in slot.module.state_dict().keys():
                key_map[_join(slot.path, key)] = _join(dw_slot.path, f"{role}.{key}")
        self.report.fused.append(FusedChain(dw_slot.path, {role: slot.path for role, slot in chain}, key_map))
        return j


def fuse(model: nn.Module, inplace: bool = False) -> Tuple[nn.Module, FuseReport]:
    """Replace every fusable depthwise-separable chain of `model` by a JointBlock (see the module
    docstring for the exact patterns); return ``(model, report)``.

    With ``inplace=False`` `model` is deep-copied first and left untouched. The JointBlocks share
    their parameters with the chain's modules (of the copy, or of `model` itself when inplace)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    order = {path: i for i, (path, _) in enumerate(model.named_modules(remove_duplicate=False))}
    fuser = _Fuser()
    model = fuser.visit(None, "", model, "")
    fuser.report.fused.sort(key=lambda c: order.get(c.path, len(order)))  # in the model's module order
    fuser.report.skipped.sort(key=lambda c: order.get(c.path, len(order)))
    return model, fuser.report


def to_reference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """`model` with every JointBlock replaced by a :class:`~lwkernels.JointBlockReference` — the plain
    PyTorch composition with the same modules (same parameters, buffers and training mode), so it
    computes the same function without the fused op. Deep-copies `model` first unless `inplace`."""
    if not inplace:
        model = copy.deepcopy(model)

    def convert(block: JointBlock) -> JointBlockReference:
        ref = JointBlockReference(block.depthwise, block.pointwise, block.bn, block.act, block.mid_bn, block.mid_act)
        ref.training = block.training
        return ref

    if isinstance(model, JointBlock):
        return convert(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, JointBlock):
                setattr(module, name, convert(child))
    return model


__all__ = ["FuseReport", "FusedChain", "SkippedChain", "fuse", "to_reference"]
