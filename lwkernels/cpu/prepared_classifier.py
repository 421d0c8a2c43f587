"""A fused classifier's whole forward as one native call: its body's replay (a LayoutSequential's
members as prepared kernel calls, cpu/prepared_sequence.py) followed by its head (average pooling,
dropout, linear: cpu/prepared_head.py), for one input signature.

Run as the model's own forward, torchvision's MobileNetV2 and MNASNet spent ~0.2-0.3 ms per call at
batch 1 after their fused features: the pooling, flatten and linear layer as PyTorch ops that the
blocks' kernels had just evicted from the caches, and the transpose of the last map back to NCHW that
only the pooling reads (docs/performance.md). Here the head reads the last map in the layout the
body's last kernel wrote it, inside the same native call.

Replayed while the body's replay itself would be (its state watch, hooks, modes and the ISA setting:
PreparedSequence.matches), the model still holds the same body and classifier, the body the same
members, neither container has hooks or a new class, and the head's modules and parameters are
unchanged (PreparedHead's watch). The caller (nn/classifier_forward.py) checks the rest: eager CPU
inference without grad on an input the plan was made for.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
from torch import nn

from .backend import native
from .native_sequence import NativeSequence, items_output
from .prepared_head import PreparedHead
from .prepared_sequence import PreparedSequence
from .state_watch import StateWatch

#: Every live PreparedClassifier, so that lwkernels.clear_cache() can drop them.
_LIVE: "weakref.WeakSet[PreparedClassifier]" = weakref.WeakSet()


def _watch_container(watch: StateWatch, module: nn.Module) -> None:
    """Its children, class and hook dicts must stay as they are."""
    watch.watch(module._modules, tuple(module._modules))
    watch.watch_class(module)
    watch.watch_empty(module._forward_hooks)
    watch.watch_empty(module._forward_pre_hooks)


class PreparedClassifier:
    """One input signature's native call of body + head; see the module docstring."""

    __slots__ = ("_replay", "_head", "_native", "_watch", "_valid", "__weakref__")

    @classmethod
    def prepare(cls, model: nn.Module, names: Sequence[str], replay: PreparedSequence, head_modules,
                x: torch.Tensor) -> "Optional[PreparedClassifier]":
        """The plan for `model` (whose forward is classifier(flatten(pool(body(x)))), `names` =
        (body's name, classifier's name)), from the body's replay for inputs like `x` and the head's
        modules (pool, dropout, linear); None when the replay has a member it calls as a module or
        the head does not fit the body's output."""
        items = replay.native_items()
        if items is None:
            return None
        shape, fmt = items_output(items, x)
        if len(shape) != 4:
            return None
        features = torch.empty(shape, dtype=x.dtype).contiguous(memory_format=fmt)
        head = PreparedHead.prepare(*head_modules, features)
        if head is None:
            return None
        seq = NativeSequence.build(items + [("head", head)], x, native())
        if seq is None:
            return None
        watch = StateWatch()
        watch.watch(model._modules, tuple(names))
        body, classifier = (model._modules[name] for name in names)
        _watch_container(watch, body)
        _watch_container(watch, classifier)
        plan = cls.__new__(cls)
        plan._replay, plan._head, plan._native = replay, head, seq
        plan._watch = StateWatch.union([watch] + list(head.replay_state()[0]))
        plan._valid = True
        _LIVE.add(plan)
        return plan

    def matches(self, x: torch.Tensor) -> bool:
        """True when replaying gives what the model's forward would for `x` (the caller has checked
        eager CPU inference without grad)."""
        return self._valid and self._native.matches(x) and self._watch.unchanged() and self._head.valid \
            and self._replay.matches(eager_checked=True)

    @property
    def native(self) -> NativeSequence:
        """The native call (profiling: its step timing)."""
        return self._native

    def run(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The model's [N, classes] output for `x`; None while another thread runs this plan."""
        return self._native.run(x)

    def invalidate(self) -> None:
        self._valid = False
        self._native = None  # (frees its work buffers)


def invalidate_all() -> None:
    """Drop every prepared classifier (lwkernels.clear_cache())."""
    for plan in list(_LIVE):
        plan.invalidate()
