"""The `lwkernels` command line (also `python -m lwkernels`): bench, info, train, eval."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import bench, info


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="lwkernels", description="Fused depthwise-separable joint blocks for PyTorch.")
    parser.add_argument("--version", action="version", version=f"lwkernels {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    bench.register(subparsers)
    info.register(subparsers)
    from . import train

    train.register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"lwkernels {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
