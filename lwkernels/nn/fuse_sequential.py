"""The fallback matcher for nn.Sequential containers torch.fx cannot trace: a chain of consecutive
children (nested transparent Sequentials looked through, nn.Identity children ignored)

    depthwise Conv2d -> [BatchNorm2d] -> [act] -> 1x1 Conv2d -> BatchNorm2d -> [act]

Children that start no chain are handed back to fuse() (``visit``), which traces them on their own.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

from torch import nn

from .block import JointBlock, check_joint_modules
from .fuse_patterns import has_hooks, module_activation, stock, supported_activations
from .fuse_report import FusedChain, FuseReport, SkippedChain

Visit = Callable[[nn.Module, str], nn.Module]  # (module, path) -> what now stands in its place


def is_transparent(m: nn.Module) -> bool:
    """A Sequential whose children run one after another with nothing in between."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward and not has_hooks(m)


def _is_act(m: nn.Module) -> bool:
    name = module_activation(m)
    return name not in (None, "none") and name in supported_activations()


def _is_bn(m: nn.Module) -> bool:
    return stock(m, nn.BatchNorm2d)


def _is_skippable(m: nn.Module) -> bool:
    return type(m) is nn.Identity and not has_hooks(m)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Slot:
    """A child slot in a container: enough to read and replace it."""

    __slots__ = ("container", "name", "module", "path")

    def __init__(self, container: nn.Module, name: str, module: nn.Module, path: str) -> None:
        self.container, self.name, self.module, self.path = container, name, module, path

    def replace(self, new: nn.Module) -> None:
        setattr(self.container, self.name, new)


class SequentialMatcher:
    def __init__(self, report: FuseReport, visit: Visit) -> None:
        self.report, self.visit = report, visit

    def flatten(self, seq: nn.Sequential, path: str, out: List[_Slot]) -> List[_Slot]:
        for name, child in seq.named_children():
            child_path = _join(path, name)
            if is_transparent(child):
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
        # What was not part of a chain goes back to fuse() (custom blocks, Sequentials inside, ...).
        for slot in slots:
            current = getattr(slot.container, slot.name)
            if current is slot.module:
                new = self.visit(current, slot.path)
                if new is not current:
                    slot.replace(new)

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
        if not stock(dw, nn.Conv2d):
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
        if not stock(pw, nn.Conv2d):
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
        if s is not None and _is_act(s.module):
            chain.append(("act", s))
            j += 1

        hooked = [slot.path for _, slot in chain if has_hooks(slot.module)]
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
