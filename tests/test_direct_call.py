"""ops.call_joint_block: eager CPU inference enters the kernel directly; everything that needs to
see the op (autograd, modes, tracing, compile) still goes through the dispatcher."""
import torch

import lwkernels
from lwkernels.ops import inference as ops
from helpers import Case, OpRecorder, make_args


def _args():
    return make_args(Case(n=2, c_in=5, c_out=7, h=9, w=8, stride=(2, 1), dilation=(2, 3)), seed=3)


def test_direct_call_equals_the_op(monkeypatch):
    args = _args()
    with torch.no_grad():
        expected = torch.ops.lwkernels.joint_block(*args)
        assert ops.direct_call_allowed(args)
        torch.testing.assert_close(ops.call_joint_block(*args), expected, rtol=0, atol=0)


def test_grad_mode_goes_through_the_op():
    args = list(_args())
    args[5] = args[5].detach().requires_grad_(True)  # pointwise weight
    assert not ops.direct_call_allowed(tuple(args))
    y = ops.call_joint_block(*args)
    assert y.grad_fn is not None
    y.sum().backward()
    assert args[5].grad is not None and torch.isfinite(args[5].grad).all()


def test_dispatch_modes_see_the_op():
    args = _args()
    with torch.no_grad(), OpRecorder() as mode:
        ops.call_joint_block(*args)
    assert any("lwkernels.joint_block" in name for name in mode.ops)


def test_eval_block_in_a_dispatch_mode_sees_one_fused_op():
    block = lwkernels.JointBlock(4, 6, dilation=2).eval()
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad(), OpRecorder() as mode:
        block(x)
    assert sum("lwkernels.joint_block" in name for name in mode.ops) == 1
    assert not any("convolution" in name for name in mode.ops)


def test_vmap_goes_through_the_op():
    """torch.func transforms wrap tensors that have no storage: the direct path must not take them."""
    block = lwkernels.JointBlock(4, 6, dilation=2).eval()
    xs = torch.randn(3, 2, 4, 9, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        block(xs[0])
        block(xs[0])  # prepared: a replay would reach data_ptr() of a wrapped tensor
        y = torch.vmap(block)(xs)
        expected = torch.stack([block.to_reference()(x) for x in xs])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
