"""The CPU backend: the C++ kernels in lwkernels._C behind the ops.

    backend.py         instruction-set choice, thread backend, weight packing cache, the op's CPU kernel
    prepared_call.py   JointBlock's replayed kernel call for eager CPU inference
    prepared_chain.py  JointChain's replayed calls on two buffers of its own
    prepared_dense_conv.py  ConvBNAct's replayed dense-convolution call
    prepared_inverted_residual.py  InvertedResidual's replayed expand + block call
    prepared_sequence.py  LayoutSequential's members replayed as their prepared calls
    state_watch.py     what a replayed call read, and whether it changed
    outputs.py         output tensors from lwkernels' buffer pool (no fresh mappings per call)
    training.py        the training op on the CPU (fused forward with statistics, C++ backward passes)
"""
