"""The nn.Module layer users import: JointBlock, JointChain, ConvBNAct, BatchNorm folding, and
fuse()/to_reference() for models written with plain PyTorch modules.

    block.py     JointBlock (and the plain-module check it shares with fuse)
    chain.py     JointChain: consecutive JointBlocks replayed on the chain's own buffers
    conv_bn_act.py  ConvBNAct: the image stem (dense conv -> BN -> act) on a native kernel
    inverted_residual.py  InvertedResidual: expand ConvBNAct + JointBlock as one native call
    layout_sequential.py  LayoutSequential: members run in the memory layout their kernels prefer
    member_calls.py  which members of a LayoutSequential only call fused modules (so they replay)
    folding.py   eval-mode BatchNorm and conv biases as per-channel scale/shift pairs
    training.py  JointBlock's training-mode forward and the running-statistics update
    fuse.py      fuse() and to_reference()
    fuse_graph.py       the torch.fx trace and the data-flow chain matcher fuse() uses
    fuse_patterns.py    the modules and functional calls a chain is recognised from
    fuse_apply.py       applying found chains: module swaps, or a traced GraphModule of the owner
    fuse_sequential.py  the nn.Sequential matcher for containers torch.fx cannot trace
    fuse_report.py      FuseReport, FusedChain, SkippedChain, TraceFallback
    fuse_conv_bn_act.py conv -> BN -> act containers (image stems, 1x1 convs) to ConvBNAct
    fuse_inverted_residual.py  expand ConvBNAct + the JointBlock it feeds to InvertedResidual
    fuse_layouts.py     containers of fused blocks to LayoutSequential
"""
