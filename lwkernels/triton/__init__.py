"""The CUDA backend: Triton kernels behind the ops (imported only where Triton and a GPU exist,
or under TRITON_INTERPRET=1 in tests).

    backend.py       registration as the op's CUDA kernel, TF32 policy
    joint_block.py   the fused depthwise -> pointwise kernel (inference, and the training forward's statistics)
    dw_backward.py   the depthwise part of the training backward
    training.py      the training op on CUDA: when Triton runs it, and its forward
"""
