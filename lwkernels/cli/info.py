"""`lwkernels info`: version, the CPU path in use, and which GPU backends are available."""
from __future__ import annotations

import platform


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="print version, CPU path and GPU availability")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from .. import __version__
    from ..cpu.backend import CPU_PATHS, native, parallel_backend_in_use, selected_isa

    _C = native()
    supported = [name for name in CPU_PATHS if _C.isa_supported(name)]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.cuda.is_available()
    rows = [
        ("lwkernels", __version__),
        ("torch", torch.__version__),
        ("python", platform.python_version()),
        ("machine", platform.machine()),
        ("CPU path", f"{selected_isa()} (supported: {', '.join(supported)}; best: {_C.best_isa()})"),
        ("threads", f"{torch.get_num_threads()} ({parallel_backend_in_use()})"),
        ("triton", triton_version),
        ("CUDA", torch.cuda.get_device_name() if cuda else "not available"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
