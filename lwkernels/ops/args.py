"""The ops' arguments as records: each long signature is written once, here and in the op's
definition, and the backends take the record instead of repeating it.

    JointArgs    lwkernels::joint_block's arguments, in its order
    InvertedResidualArgs  lwkernels::inverted_residual's arguments, in its order
    TrainArgs    lwkernels::joint_block_train's arguments, in its order
    TrainSaved   what its backward (lwkernels::joint_block_train_backward) reads, in that op's order
    TrainOutputs its outputs
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

from torch import Tensor


class JointArgs(NamedTuple):
    """t = mid_act(dw_scale * DW(x; stride, padding, dilation) + dw_shift);
    y = out_act(pw_scale * PW(t) + pw_shift + residual). Checked by contract.check_joint_args."""

    x: Tensor
    dw_weight: Tensor
    dw_scale: Optional[Tensor]
    dw_shift: Optional[Tensor]
    mid_act: str
    pw_weight: Tensor
    pw_scale: Optional[Tensor]
    pw_shift: Optional[Tensor]
    residual: Optional[Tensor]
    out_act: str
    stride: List[int]
    padding: List[int]
    dilation: List[int]


class InvertedResidualArgs(NamedTuple):
    """e = expand_act(expand_scale * PW(x; expand_weight) + expand_shift), then joint_block's
    computation on e (JointArgs without x). Checked by contract.check_inverted_residual_args."""

    x: Tensor
    expand_weight: Tensor
    expand_scale: Optional[Tensor]
    expand_shift: Optional[Tensor]
    expand_act: str
    dw_weight: Tensor
    dw_scale: Optional[Tensor]
    dw_shift: Optional[Tensor]
    mid_act: str
    pw_weight: Tensor
    pw_scale: Optional[Tensor]
    pw_shift: Optional[Tensor]
    residual: Optional[Tensor]
    out_act: str
    stride: List[int]
    padding: List[int]
    dilation: List[int]

    def joint(self, expanded: Tensor) -> JointArgs:
        """The depthwise -> project part's arguments with `expanded` as its input."""
        return JointArgs(expanded, *self[5:])


class TrainArgs(NamedTuple):
    """c = DW(x); t = mid_act(mid_bn(c + dw_bias)); z = PW(t) + pw_bias; y = out_act(bn(z) + residual),
    with both BatchNorms on batch statistics (mid_bn only when `mid_bn` is True)."""

    x: Tensor
    dw_weight: Tensor
    dw_bias: Optional[Tensor]
    mid_weight: Optional[Tensor]
    mid_bias: Optional[Tensor]
    mid_bn: bool
    mid_eps: float
    mid_act: str
    pw_weight: Tensor
    pw_bias: Optional[Tensor]
    bn_weight: Optional[Tensor]
    bn_bias: Optional[Tensor]
    eps: float
    residual: Optional[Tensor]
    out_act: str
    stride: List[int]
    padding: List[int]
    dilation: List[int]


class TrainSaved(NamedTuple):
    """The forward's inputs and outputs that the backward needs: the depthwise output is not saved
    (it is recomputed from x); bn_bias and the residual only where out_act's gradient needs its input."""

    x: Tensor
    dw_weight: Tensor
    dw_bias: Optional[Tensor]
    mid_weight: Optional[Tensor]
    mid_bias: Optional[Tensor]
    mid_mean: Tensor
    mid_var: Tensor
    mid_bn: bool
    mid_eps: float
    mid_act: str
    pw_weight: Tensor
    bn_weight: Optional[Tensor]
    bn_bias: Optional[Tensor]   # saved (else None) only when out_act's gradient needs its input:
    residual: Optional[Tensor]  # out_act(bn(z) + residual), recomputed from them (hardswish, silu)
    y: Tensor
    z: Tensor
    mean: Tensor
    var: Tensor
    eps: float
    out_act: str
    stride: List[int]
    padding: List[int]
    dilation: List[int]


#: joint_block_train's outputs: (y, z, mean, var, mid_mean, mid_var); mean/var are z's biased batch
#: statistics, mid_* those of the depthwise output c (empty without mid BatchNorm).
TrainOutputs = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]

#: The gradients joint_block_train_backward returns, in order (its `needs` flags follow this order).
GRAD_NAMES = ("x", "dw_weight", "dw_bias", "mid_weight", "mid_bias", "pw_weight", "pw_bias", "bn_weight",
              "bn_bias", "residual")
