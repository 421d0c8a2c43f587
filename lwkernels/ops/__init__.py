"""The op layer: what the fused ops compute and accept, independent of any device.

    contract.py             argument checks, output shape and memory format (every backend uses them)
    activation.py           the activations the ops know, by name
    reference.py            the plain PyTorch composition: the one definition of correct
    inference.py            torch.ops.lwkernels.joint_block (BatchNorm folded), its fake and dispatch
    inference_backward.py   its autograd formula
    training.py             torch.ops.lwkernels.joint_block_train (batch statistics) and its backward

Backends register kernels for these ops: cpu/ (C++ through lwkernels._C) and triton/ (CUDA).
"""
