"""torch.ops.lwkernels.joint_block and torch.ops.lwkernels.inverted_residual in ONNX: standard
operators any runtime has.

    t = mid_act(Conv(x, dw_weight * dw_scale, bias=dw_shift, group=C_in))
    y = out_act(Conv(t, pw_weight * pw_scale, bias=pw_shift) + residual)

(the inverted residual first computes x = expand_act(Conv(x, expand_weight * expand_scale,
bias=expand_shift)))
(per-channel scales folded into the convolution weights, shifts as the convolutions' biases; relu as
Relu, relu6 as Clip(0, 6), hardswish as HardSwish or x * HardSigmoid(x), silu as x * Sigmoid(x)). The graph is written once against a small emitter interface, with one
emitter for each torch.onnx exporter:

- the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): a symbolic registered
  with torch.onnx.register_custom_op_symbolic when lwkernels is imported;
- the torch.export-based exporter (``dynamo=True``, the default): :func:`onnx_translation_table`,
  passed as ``custom_translation_table`` by code that calls the ops directly. JointBlock and
  InvertedResidual need neither: under ONNX export they run their plain PyTorch composition, which
  both exporters translate.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch

#: Opset the TorchScript symbolic is registered from (Clip with min/max inputs).
SYMBOLIC_OPSET = 11


def _emit(ops, x, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, pw_scale, pw_shift, residual, out_act,
          stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], channels: int):
    """The op's graph through `ops` (an emitter: conv, scale_rows, add, act, is_none)."""
    w = dw_weight if ops.is_none(dw_scale) else ops.scale_rows(dw_weight, dw_scale)
    t = ops.conv(x, w, None if ops.is_none(dw_shift) else dw_shift, channels, stride, padding, dilation)
    t = ops.act(t, mid_act)
    w = pw_weight if ops.is_none(pw_scale) else ops.scale_rows(pw_weight, pw_scale)
    y = ops.conv(t, w, None if ops.is_none(pw_shift) else pw_shift, 1, (1, 1), (0, 0), (1, 1))
    if not ops.is_none(residual):
        y = ops.add(y, residual)
    return ops.act(y, out_act)


def _emit_expand(ops, x, weight, scale, shift, act):
    """The inverted residual's expand step through `ops`."""
    w = weight if ops.is_none(scale) else ops.scale_rows(weight, scale)
    return ops.act(ops.conv(x, w, None if ops.is_none(shift) else shift, 1, (1, 1), (0, 0), (1, 1)), act)


# -- the torch.export-based exporter: onnxscript ------------------------------------------------------
class _OnnxScriptOps:
    def __init__(self):
        from onnxscript import opset18

        self.op = opset18

    @staticmethod
    def is_none(v) -> bool:
        return v is None

    def conv(self, x, w, b, group, stride, padding, dilation):
        kwargs = dict(group=group, strides=list(stride), pads=list(padding) * 2, dilations=list(dilation))
        return self.op.Conv(x, w, b, **kwargs) if b is not None else self.op.Conv(x, w, **kwargs)

    def scale_rows(self, w, v):
        return self.op.Mul(w, self.op.Reshape(v, self.op.Constant(value_ints=[-1, 1, 1, 1])))

    def add(self, a, b):
        return self.op.Add(a, b)

    def act(self, v, name: str):
        if name == "relu":
            return self.op.Relu(v)
        if name == "relu6":
            zero = self.op.CastLike(self.op.Constant(value_float=0.0), v)
            six = self.op.CastLike(self.op.Constant(value_float=6.0), v)
            return self.op.Clip(v, zero, six)
        if name == "hardswish":
            return self.op.HardSwish(v)
        if name == "silu":
            return self.op.Mul(v, self.op.Sigmoid(v))
        if name == "none":
            return v
        raise ValueError(f"no ONNX translation for activation {name!r}")


def _joint_block_onnxscript(x, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, pw_scale, pw_shift, residual,
                            out_act, stride, padding, dilation):
    return _emit(_OnnxScriptOps(), x, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, pw_scale, pw_shift,
                 residual, out_act, stride, padding, dilation, channels=dw_weight.shape[0])


def _inverted_residual_onnxscript(x, expand_weight, expand_scale, expand_shift, expand_act, *joint):
    e = _emit_expand(_OnnxScriptOps(), x, expand_weight, expand_scale, expand_shift, expand_act)
    return _joint_block_onnxscript(e, *joint)


def onnx_translation_table() -> Dict:
    """``{op: translation}`` for lwkernels::joint_block and lwkernels::inverted_residual, for
    torch.onnx.export's ``custom_translation_table`` (dynamo=True), for models that call the ops
    directly."""
    return {torch.ops.lwkernels.joint_block.default: _joint_block_onnxscript,
            torch.ops.lwkernels.inverted_residual.default: _inverted_residual_onnxscript}


# -- the TorchScript-based exporter: a symbolic -------------------------------------------------------
class _TorchScriptOps:
    def __init__(self, g):
        self.g = g

    @staticmethod
    def is_none(v) -> bool:
        from torch.onnx import symbolic_helper

        return v is None or symbolic_helper._is_none(v)

    def conv(self, x, w, b, group, stride, padding, dilation):
        inputs = (x, w) if b is None else (x, w, b)
        return self.g.op("Conv", *inputs, group_i=group, strides_i=list(stride), pads_i=list(padding) * 2,
                         dilations_i=list(dilation))

    def scale_rows(self, w, v):
        shape = self.g.op("Constant", value_t=torch.tensor([-1, 1, 1, 1], dtype=torch.int64))
        return self.g.op("Mul", w, self.g.op("Reshape", v, shape))

    def add(self, a, b):
        return self.g.op("Add", a, b)

    def act(self, v, name: str):
        if name == "relu":
            return self.g.op("Relu", v)
        if name == "relu6":
            return self.g.op("Clip", v, self._scalar_like(0.0, v), self._scalar_like(6.0, v))
        if name == "hardswish":  # HardSwish itself needs opset 14
            return self.g.op("Mul", v, self.g.op("HardSigmoid", v, alpha_f=1.0 / 6.0, beta_f=0.5))
        if name == "silu":
            return self.g.op("Mul", v, self.g.op("Sigmoid", v))
        if name == "none":
            return v
        raise ValueError(f"no ONNX translation for activation {name!r}")

    def _scalar_like(self, value: float, v):
        dtype = torch.onnx.JitScalarType.from_value(v, torch.onnx.JitScalarType.FLOAT).dtype()
        return self.g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _joint_block_symbolic(g, x, dw_weight, dw_scale, dw_shift, mid_act, pw_weight, pw_scale, pw_shift, residual,
                          out_act, stride, padding, dilation):
    from torch.onnx import symbolic_helper as sh

    channels = sh._get_tensor_dim_size(dw_weight, 0)
    if channels is None:
        raise RuntimeError("lwkernels::joint_block: ONNX export needs dw_weight's channel count to be known")
    return _emit(_TorchScriptOps(g), x, dw_weight, dw_scale, dw_shift, sh._parse_arg(mid_act, "s"), pw_weight,
                 pw_scale, pw_shift, residual, sh._parse_arg(out_act, "s"), sh._parse_arg(stride, "is"),
                 sh._parse_arg(padding, "is"), sh._parse_arg(dilation, "is"), channels)


def _inverted_residual_symbolic(g, x, expand_weight, expand_scale, expand_shift, expand_act, *joint):
    from torch.onnx import symbolic_helper as sh

    e = _emit_expand(_TorchScriptOps(g), x, expand_weight, expand_scale, expand_shift,
                     sh._parse_arg(expand_act, "s"))
    return _joint_block_symbolic(g, e, *joint)


def register_symbolic() -> None:
    """Registers the TorchScript-exporter symbolics (called when lwkernels is imported)."""
    torch.onnx.register_custom_op_symbolic("lwkernels::joint_block", _joint_block_symbolic, SYMBOLIC_OPSET)
    torch.onnx.register_custom_op_symbolic("lwkernels::inverted_residual", _inverted_residual_symbolic,
                                           SYMBOLIC_OPSET)
