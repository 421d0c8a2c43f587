"""The op layer: what the fused ops compute and accept, independent of any device.

    args.py                 the ops' argument lists as records (JointArgs, TrainArgs, TrainSaved)
    contract.py             argument checks, output shape and memory format (every backend uses them)
    activation.py           the activations the ops know, by name, and their gradients
    reference.py            the plain PyTorch composition: the one definition of correct
    inference.py            torch.ops.lwkernels.joint_block (BatchNorm folded), its fake and dispatch
    inference_backward.py   its autograd formula
    training.py             torch.ops.lwkernels.joint_block_train (batch statistics) and its backward
    training_reference.py   the training op in PyTorch ops (any device)
    batch_norm.py           batch-statistics arithmetic shared by the training op's backends

Backends register kernels for these ops: cpu/ (C++ through lwkernels._C) and triton/ (CUDA).
"""
