"""The nn.Module layer users import: JointBlock, BatchNorm folding, and fuse()/to_reference() for
models written with plain PyTorch modules.

    block.py     JointBlock (and the plain-module check it shares with fuse)
    folding.py   eval-mode BatchNorm and conv biases as per-channel scale/shift pairs
    training.py  JointBlock's training-mode forward and the running-statistics update
    fuse.py      fuse() and to_reference()
"""
