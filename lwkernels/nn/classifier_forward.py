"""ClassifierForward: the forward fuse() gives a model whose own forward is a classifier head after one
body module — ``classifier(flatten(global_average_pool(body(x))))``, as torchvision's MobileNetV2 and
MNASNet write it (nn/fuse_head.py finds that pattern).

The model keeps its class, children, parameters and state_dict; only its instance gets this object's
``forward`` method as its own ``forward`` (nn.Module calls ``self.forward``, hooks on the model still
run around it, and to_reference() removes it). In eager CPU inference without grad, on a 4-D float input, it runs the
body, then the head — pooling, dropout and the linear layer — as one fused kernel call
(cpu/prepared_head.py) instead of PyTorch's ops; once the body replays its members as one native call
(a LayoutSequential), body and head run together as a single native call for that input signature
(cpu/prepared_classifier.py). The head's average differs from PyTorch's pooling by rounding only.
Anything else — training, autograd, compiling, tracing, exporting, a changed classifier, hooks on the
head's modules, other arguments — runs the class's own forward, exactly as before fuse().
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..cpu.prepared_classifier import PreparedClassifier
from ..cpu.prepared_head import PreparedHead, head_modules_fit
from ..ops.contract import output_memory_format
from ..ops.inference import modes_active
from .layout_sequential import LayoutSequential, layouts_apply
from .retry_schedule import RetrySchedule


@dataclass(frozen=True)
class HeadPattern:
    """How a model's forward reads: ``classifier(flatten(pool(body(x))))``.

    ``pool`` is "adaptive_avg_pool2d" (the function, to 1 x 1, then ``flatten``), "mean" (x.mean over
    the two spatial dimensions, already flat) or the name of an nn.AdaptiveAvgPool2d child (then
    ``flatten``); ``body`` and ``classifier`` are the names of the model's children."""

    body: str
    pool: str
    classifier: str
    pool_args: Tuple = ()

    def plain_head(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        """What the model's forward does after its body, with PyTorch's ops."""
        if self.pool == "mean":
            pooled = features.mean(*self.pool_args)
        elif self.pool == "adaptive_avg_pool2d":
            pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(features, *self.pool_args), 1)
        else:
            pooled = torch.flatten(model._modules[self.pool](features), 1)
        return model._modules[self.classifier](pooled)


#: Input signatures a model keeps plans for (a few image sizes and batch sizes).
_MAX_PLANS = 8


def classifier_parts(module: Optional[nn.Module]) -> Optional[Tuple[Optional[nn.Module], nn.Linear]]:
    """(dropout or None, linear) of a classifier written as an nn.Linear or an nn.Sequential of an
    optional dropout (or nn.Identity) and an nn.Linear; None for anything else. What fuse() looks for
    (nn/fuse_head.py) and what each call takes apart (whether the dropout is inert and nothing has
    hooks, PreparedHead decides)."""
    if type(module) is nn.Linear:
        return None, module
    if type(module) is not nn.Sequential or len(module) not in (1, 2):
        return None
    *rest, linear = module._modules.values()
    dropout = rest[0] if rest else None
    if type(linear) is not nn.Linear or (dropout is not None and type(dropout) not in (nn.Dropout, nn.Identity)):
        return None
    return dropout, linear


class _Slot:
    """One input signature's plan and when to try preparing it again (nn/retry_schedule.py)."""

    __slots__ = ("plan", "schedule")

    def __init__(self) -> None:
        self.plan: Optional[PreparedClassifier] = None
        self.schedule = RetrySchedule()


class ClassifierForward:
    """The instance-level forward of a fused classifier; see the module docstring."""

    def __init__(self, model: nn.Module, pattern: HeadPattern) -> None:
        # The model holds this object (its forward): a weak reference back avoids a cycle, so the model
        # and the plans' buffers go when the last user reference does.
        self._model_ref = weakref.ref(model)
        self._pattern = pattern
        self._forward = type(model).forward  # the class's forward the pattern was read from
        # Stands in for functional pooling in the fused head (never registered on the model).
        self._pool = nn.AdaptiveAvgPool2d(1)
        self._slots: Dict[Tuple, _Slot] = {}
        self._heads: Dict[Tuple, PreparedHead] = {}

    @property
    def pattern(self) -> HeadPattern:
        return self._pattern

    @property
    def _model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("this forward's model no longer exists")
        return model

    def forward(self, x, *args, **kwargs):
        """The model's forward (installed as the bound method; torch.export reads its code)."""
        model = self._model
        forward = type(model).forward
        if forward is self._forward and not args and not kwargs and layouts_apply(x):
            y = self._fused(model, x)
            if y is not None:
                return y
        return forward(model, x, *args, **kwargs)

    def _fused(self, model: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        key = (x.shape, x.dtype, x.is_contiguous())
        slot = self._slots.get(key)
        if slot is not None and slot.plan is not None:
            if slot.plan.matches(x):
                y = slot.plan.run(x)
                if y is not None:
                    slot.schedule.replayed()
                    return y
            else:
                slot.plan = None
                slot.schedule.went_stale()
        head_modules = self._head_modules(model)
        body = model._modules.get(self._pattern.body)
        if head_modules is None or body is None:
            return None
        features = body(x)
        y = self._head(model, features, head_modules)
        if slot is None:
            if len(self._slots) >= _MAX_PLANS:
                self._slots.clear()
            slot = self._slots[key] = _Slot()
        if slot.schedule.try_due() and slot.plan is None:
            replay = self._body_replay(body, x)
            if replay is None:  # (the body prepares its replay on its second call)
                slot.schedule.not_yet()
            else:
                slot.plan = PreparedClassifier.prepare(model, (self._pattern.body, self._pattern.classifier),
                                                       replay, head_modules, x)
                if slot.plan is None or not slot.plan.matches(x):
                    slot.plan = None
                    slot.schedule.failed()
                else:
                    slot.schedule.prepared()
        return y

    def _head_modules(self, model: nn.Module) -> Optional[Tuple]:
        """(pool, dropout or None, linear) when the head fuses now, else None."""
        p = self._pattern
        classifier = model._modules.get(p.classifier)
        parts = classifier_parts(classifier)
        if parts is None or classifier._forward_hooks or classifier._forward_pre_hooks:
            return None
        dropout, linear = parts
        pool = self._pool if p.pool in ("mean", "adaptive_avg_pool2d") else model._modules.get(p.pool)
        return (pool, dropout, linear) if head_modules_fit(pool, dropout, linear) else None

    def _head(self, model: nn.Module, features, head_modules) -> torch.Tensor:
        """The head on the body's output: fused when it fits, else PyTorch's ops."""
        if type(features) is torch.Tensor and features.dim() == 4 and not modes_active():
            key = (features.shape, features.dtype, output_memory_format(features))
            head = self._heads.get(key)
            if head is None or not head.serves(head_modules, features):
                if len(self._heads) >= _MAX_PLANS:
                    self._heads.clear()
                head = self._heads[key] = PreparedHead.prepare(*head_modules, features)
            if head is not None and head.serves(head_modules, features):
                return head.run(features)
        return self._pattern.plain_head(model, features)

    @staticmethod
    def _body_replay(body: nn.Module, x: torch.Tensor):
        """The replay a LayoutSequential body prepared for `x`'s signature, if it would replay now."""
        if type(body) is not LayoutSequential:
            return None
        layout_plan = body.__dict__.get("_layout_plans", {}).get((tuple(x.shape), x.dtype))
        replay = None if layout_plan is None else layout_plan.replay
        return replay if replay is not None and replay.matches(eager_checked=True) else None

    def plans(self):
        """The native plans prepared so far (profiling)."""
        return [slot.plan for slot in self._slots.values() if slot.plan is not None]

    def __reduce__(self):
        # (pickle and deepcopy: rebuilt for the copy of the model; the plans hold native objects and
        # buffers, which are never copied)
        return (ClassifierForward, (self._model, self._pattern))


def installed(model: nn.Module) -> Optional[ClassifierForward]:
    """The ClassifierForward fuse() gave `model`, or None."""
    owner = getattr(model.__dict__.get("forward"), "__self__", None)
    return owner if isinstance(owner, ClassifierForward) else None
