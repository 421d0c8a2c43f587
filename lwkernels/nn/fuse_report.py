"""What fuse() did: the chains it fused, the near-misses with the reason, and where it could not trace."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional

if TYPE_CHECKING:
    from .classifier_forward import HeadPattern


@dataclass(frozen=True)
class FusedChain:
    """One chain replaced by a JointBlock at ``path`` (the depthwise conv's old place).

    ``modules`` maps each role (depthwise, mid_bn, mid_act, pointwise, bn, act, add) to the path the
    module had (or, for an op written in a forward(), which forward); ``key_map`` maps old
    state_dict keys to the fused model's keys. ``owner`` is the path of the module that was replaced
    by a torch.fx GraphModule of itself ("" for the whole model), or None when only the chain's
    module slots changed."""

    path: str
    modules: Dict[str, str]
    key_map: Dict[str, str] = field(default_factory=dict)
    owner: Optional[str] = None

    def __str__(self) -> str:
        s = f"{self.path}: " + " -> ".join(f"{role}={p}" for role, p in self.modules.items())
        if self.owner is not None:
            s += f" [{self.owner or 'the model'} became a traced GraphModule]"
        return s


@dataclass(frozen=True)
class SkippedChain:
    """A near-miss: a grouped/depthwise conv (at ``path``) that starts no fusable chain, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class TraceFallback:
    """A module (at ``path``, "" for the model) torch.fx could not trace; fuse() looked inside it
    (``how``: its children traced one by one, or the nn.Sequential matcher)."""

    path: str
    reason: str
    how: str

    def __str__(self) -> str:
        return f"{self.path or 'the model'}: {self.reason}; {self.how}"


@dataclass
class FuseReport:
    fused: List[FusedChain] = field(default_factory=list)
    skipped: List[SkippedChain] = field(default_factory=list)
    fallbacks: List[TraceFallback] = field(default_factory=list)
    #: Paths of Conv2d -> BatchNorm2d -> act containers (image stems, 1x1 convs) now ConvBNAct;
    #: their state_dict keys are unchanged.
    conv_bn_acts: List[str] = field(default_factory=list)
    #: Modules moved into a ConvBNAct from sibling slots of a flat container (old path -> new path;
    #: their old slots hold nn.Identity now), and their state_dict keys (old -> new).
    conv_bn_act_moves: Dict[str, str] = field(default_factory=dict)
    moved_keys: Dict[str, str] = field(default_factory=dict)
    #: Paths of InvertedResiduals: an expand ConvBNAct and the JointBlock it feeds, paired in the
    #: expand's slot (module moves, old path -> new path, in inverted_residual_moves; keys in moved_keys).
    inverted_residuals: List[str] = field(default_factory=list)
    inverted_residual_moves: Dict[str, str] = field(default_factory=dict)
    #: Norms with their own activation (timm's BatchNormAct2d) of paired expands: old path -> path of
    #: the plain BatchNorm2d that shares their tensors (their slots hold nn.Identity now).
    inverted_residual_norms: Dict[str, str] = field(default_factory=dict)
    #: Paths of plain nn.Sequential containers holding fused blocks, now LayoutSequentials (same
    #: members and keys; "" for the model itself).
    layout_sequentials: List[str] = field(default_factory=list)
    #: The model's forward as fuse() read it when it is a classifier head after a LayoutSequential
    #: body (nn/fuse_head.py): the model got a ClassifierForward that runs the head fused; else None.
    classifier_head: Optional["HeadPattern"] = None

    def key_map(self) -> Dict[str, str]:
        """Old state_dict key -> fused model's key, for every fused chain and moved module."""
        out: Dict[str, str] = {}
        for chain in self.fused:
            out.update(chain.key_map)
        out.update(self.moved_keys)
        return out

    def map_state_dict(self, state_dict: Mapping[str, object]) -> "OrderedDict[str, object]":
        """A state_dict of the unfused model (a checkpoint) under the fused model's keys, ready for
        ``fused.load_state_dict()``. It also carries the per-module versions that ``state_dict()``
        keeps in its ``_metadata`` (moved with their modules): some modules check them while loading
        (torchvision's MNASNet refuses a checkpoint without its version, BatchNorm2d reads it), and a
        plain dict of renamed keys would drop them."""
        key_map = self.key_map()
        out: "OrderedDict[str, object]" = OrderedDict((key_map.get(k, k), v) for k, v in state_dict.items())
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            # A module's keys all move with it: "<old module>.<name>" -> "<new module>.<name>".
            moved = {old.rpartition(".")[0]: new.rpartition(".")[0] for old, new in key_map.items()
                     if old.rpartition(".")[2] == new.rpartition(".")[2]}
            out._metadata = OrderedDict((moved.get(prefix, prefix), info)  # type: ignore[attr-defined]
                                        for prefix, info in metadata.items())
        return out

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} chain(s), skipped {len(self.skipped)} near-miss(es)"]
        lines += [f"  fused   {c}" for c in self.fused]
        lines += [f"  skipped {s}" for s in self.skipped]
        lines += [f"  not traced {f}" for f in self.fallbacks]
        lines += [f"  native  {p or '(the model)'}: ConvBNAct" for p in self.conv_bn_acts]
        lines += [f"  native  {p}: InvertedResidual (expand + block)" for p in self.inverted_residuals]
        lines += [f"  layouts {p or '(the model)'}: LayoutSequential" for p in self.layout_sequentials]
        if self.classifier_head is not None:
            h = self.classifier_head
            lines.append(f"  head    (the model): {h.body} -> pool -> {h.classifier} fused (ClassifierForward)")
        return "\n".join(lines)
