"""The `lwkernels` command line (main.py) and its subcommands: bench, info, and the CIFAR-10
training application (train.py with cifar.py and plotting.py)."""
