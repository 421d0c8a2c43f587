"""The CPU backend: the C++ kernels in lwkernels._C behind the ops.

    backend.py         instruction-set choice, thread backend, weight packing cache, the op's CPU kernel
    prepared_call.py   JointBlock's replayed kernel call for eager CPU inference
    training.py        the training op on the CPU (fused forward with statistics, C++ backward passes)
"""
