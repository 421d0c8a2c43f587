"""Subcommands of the `lwkernels` command line; each module exposes register(subparsers)."""
