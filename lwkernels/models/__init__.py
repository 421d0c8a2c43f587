"""The model zoo: the seed papers' networks built from JointBlocks (see docs/networks.md).

    from lwkernels.models import LightweightNet, build_model
    model = LightweightNet(num_classes=10, width_mult=1.0, dilation=3)
    reference = model.to_reference()      # same weights, plain PyTorch modules

``build_model(name, **options)`` builds one by name (``MODELS``), ignoring options the model does
not take (for the command line).
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict

from torch import nn

from ..nn.fuse import to_reference
from ._common import count_parameters
from .dsrnet import DSRBlock, DSRNet
from .lightweightnet import LightweightNet
from .mobilenet import MobileNetV1
from .multiscale import MultiScaleNet, MultiScaleUnit

#: Constructors by command-line name.
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "lightweightnet": LightweightNet,
    "multiscalenet": MultiScaleNet,
    "dsrnet": DSRNet,
    "mobilenetv1": MobileNetV1,
}


def build_model(name: str, **options) -> nn.Module:
    """``MODELS[name](**options)``, dropping options (or None values) the constructor does not take."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    ctor = MODELS[key]
    accepted = inspect.signature(ctor.__init__).parameters
    return ctor(**{k: v for k, v in options.items() if k in accepted and v is not None})


__all__ = [
    "DSRBlock", "DSRNet", "LightweightNet", "MODELS", "MobileNetV1", "MultiScaleNet", "MultiScaleUnit",
    "build_model", "count_parameters", "to_reference",
]
