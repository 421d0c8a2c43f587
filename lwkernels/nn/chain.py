"""JointChain: an nn.Sequential of JointBlocks that eager CPU inference runs as one prepared plan."""
from __future__ import annotations

import torch
from torch import nn

from ..cpu.prepared_chain import PreparedChain, inner_format, runs_channels_last
from ..cpu.prepared_head import PreparedHead, head_modules_fit
from ..ops.contract import output_memory_format
from ..ops.inference import dispatcher_needed, is_tracing
from .block import JointBlock
from .conv_bn_act import ConvBNAct


class JointChain(nn.Sequential):
    """``nn.Sequential(*blocks)`` for JointBlocks that follow each other, with a faster eager CPU path.

    Everything about it is nn.Sequential's: indexing, slicing, appending, state_dict keys
    (``"0.depthwise.weight"``, ...), training, autograd, ``torch.compile``, ``torch.export`` and ONNX
    export (each block as usual). In eager CPU inference (eval-mode BatchNorm, nothing requiring
    grad) it replays a plan prepared on the first call (cpu/prepared_chain.py): the blocks' prepared
    calls run back to back from one native call, on two work buffers instead of a fresh tensor per
    intermediate. In a chain of four or more float32 blocks with 16 or more input channels, those
    blocks run channels-last, whose kernels are faster, converting once on the way in and back to
    the input's memory format at the end; the first call converts the same way, so every call
    returns the same values. They equal the blocks called in turn up to rounding (the two layouts'
    kernels sum in different orders).

    The buffers (two of the largest intermediate's size) live as long as the plan: until the input
    signature changes, ``lwkernels.clear_cache()``, or the chain is freed. The fast path needs every
    module to be a :class:`~lwkernels.JointBlock` (a chain holding anything else, e.g. after
    ``to_reference(..., inplace=True)`` swapped its blocks, runs as a plain nn.Sequential).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.compiler.is_compiling() or is_tracing()):
            plan = self.__dict__.get("_plan")
            if plan is not None and plan.matches(self, x):
                y = plan.run(x)
                if y is not None:
                    return y
        blocks = list(self._modules.values())
        fused = all(isinstance(b, JointBlock) and type(b).forward is JointBlock.forward for b in blocks)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not (fused and x.is_cpu and not needs_grad) or torch.compiler.is_compiling() or is_tracing():
            for block in blocks:
                x = block(x)
            return x
        # Eager CPU inference: each block in the layout the replay runs it in (inner_format), the
        # output in the caller's layout, so that the replay returns these very values.
        caller_format = output_memory_format(x)
        channels_last = runs_channels_last(blocks, x.dtype)
        y, out_shapes = x, []
        for block in blocks:
            want = inner_format(tuple(y.shape), channels_last, caller_format)
            if output_memory_format(y) != want:
                y = y.contiguous(memory_format=want)
            y = block(y)
            out_shapes.append(tuple(y.shape))
        y = y.contiguous(memory_format=caller_format)
        if not torch.is_grad_enabled():
            self.__dict__["_plan"] = PreparedChain.prepare(self, x, out_shapes)
        return y

    def classify(self, x: torch.Tensor, pool: nn.Module, dropout: "nn.Module | None",
                 classifier: nn.Module, stem: "nn.Module | None" = None) -> torch.Tensor:
        """``classifier(dropout(torch.flatten(pool(self(stem(x))), 1)))``: a classification model's
        head after its chain (``dropout`` and ``stem`` may be None), as lwkernels' models call it.

        In eager CPU inference, with average pooling to 1 x 1, an eval-mode (or no) dropout and an
        nn.Linear, the head runs as one more fused call (cpu/prepared_head.py) at the end of the
        chain's native sequence: PyTorch's pooling and linear layer, run right after the blocks,
        found their code and data evicted and cost 0.1-0.2 ms at batch 1. Every call returns the
        same values, which equal PyTorch's head up to rounding. A ConvBNAct ``stem`` on its native
        path joins the same call, ahead of the blocks. Anything else runs the modules."""
        head_modules = (pool, dropout, classifier)
        traced = torch.compiler.is_compiling() or is_tracing()
        # (the plan calls neither this chain nor its blocks: hooks on the chain need the modules)
        if not traced and not (self._forward_hooks or self._forward_pre_hooks):
            plan = self.__dict__.get("_head_plan")
            if plan is not None and plan.matches(self, x, head_modules, stem):
                y = plan.run(x)
                if y is not None:
                    return y
        blocks = list(self._modules.values())
        chain_input = x if stem is None else stem(x)
        features = self(chain_input)
        head = None
        if not traced and self._fused_inference(blocks, features) and head_modules_fit(*head_modules) \
                and not (torch.is_grad_enabled() and any(p.requires_grad for p in classifier.parameters())):
            # In the layout the chain's sequence leaves the last block's output in, as the replay does.
            inner = inner_format(tuple(features.shape), runs_channels_last(blocks, features.dtype),
                                 output_memory_format(features))
            features = features.contiguous(memory_format=inner)
            head = PreparedHead.prepare(pool, dropout, classifier, features)
        if head is None:
            return plain_head(features, pool, dropout, classifier)
        y = head.run(features)
        chain_plan = self.__dict__.get("_plan")
        stem_part = _stem_part(stem, x)
        if chain_plan is not None and chain_plan.matches(self, chain_input) and stem_part is not False:
            self.__dict__["_head_plan"] = PreparedChain.prepare(self, chain_input, chain_plan.out_shapes, head,
                                                                stem_part)
        return y

    def _fused_inference(self, blocks, y: torch.Tensor) -> bool:
        """True when this call's blocks ran their fused eager CPU inference (the chain's fast path)."""
        fused = all(isinstance(b, JointBlock) and type(b).forward is JointBlock.forward for b in blocks)
        return fused and type(y) is torch.Tensor and y.is_cpu and not y.requires_grad and not dispatcher_needed()

    def __getstate__(self):
        # The plans hold native objects, raw addresses and buffers: never pickle or deep-copy them.
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_plan", None)
        state.pop("_head_plan", None)
        return state


def _stem_part(stem, x: torch.Tensor):
    """(stem, its prepared call) for a plan to start with, None without a stem, False when the stem
    cannot join one (not a ConvBNAct on its native path for x, or hooks on it)."""
    if stem is None:
        return None
    call = stem.__dict__.get("_prepared") if type(stem) is ConvBNAct else None
    children = tuple(stem._modules.values())
    if call is None or stem._forward_hooks or stem._forward_pre_hooks or not call.matches(children, x):
        return False
    return stem, call


def plain_head(features: torch.Tensor, pool: nn.Module, dropout: "nn.Module | None",
               classifier: nn.Module) -> torch.Tensor:
    """``classifier(dropout(torch.flatten(pool(features), 1)))`` by the modules themselves."""
    h = torch.flatten(pool(features), 1)
    return classifier(h if dropout is None else dropout(h))


def classify(features: nn.Module, x: torch.Tensor, pool: nn.Module, dropout: "nn.Module | None",
             classifier: nn.Module, stem: "nn.Module | None" = None) -> torch.Tensor:
    """A model's ``stem`` (if any), ``features``, then its head: JointChain.classify for a
    JointChain, the modules one after the other for anything else (a model after to_reference, say)."""
    if isinstance(features, JointChain):
        return features.classify(x, pool, dropout, classifier, stem)
    return plain_head(features(x if stem is None else stem(x)), pool, dropout, classifier)
