"""ONNX Runtime as a benchmark provider: the plain PyTorch composition exported to ONNX, run by an
InferenceSession on the CPU.

    from lwkernels.bench.onnxrt import onnxruntime_available, make_ort_provider
    if onnxruntime_available():
        run = make_ort_provider(to_reference(model), x)   # run() -> torch.Tensor, like every provider

What is compared: the reference twin (every JointBlock replaced by JointBlockReference, the same
weights) exported with the TorchScript exporter at a fixed input shape, and an InferenceSession
with ONNX Runtime's default session options -- every graph optimisation (ORT_ENABLE_ALL: BN folded
into the convs, ReLU fused, NCHWc blocked layouts with reorders at the ends), worker threads that
spin between calls -- except the thread counts: ``intra_op_num_threads`` = the threads torch uses
(so both engines get the same cores), ``inter_op_num_threads`` = 1 (a sequential graph). Needs the
optional packages onnxruntime and onnx (``pip install '.[bench]'``).

ONNX Runtime's worker threads keep spinning for a while after each call, and so does PyTorch's
OpenMP team: time providers in separate rounds with pauses between them
(:func:`lwkernels.bench.harness.time_in_rounds`), never call by call.
"""
from __future__ import annotations

import functools
import io
from typing import Callable, Optional

import torch
from torch import nn

#: The exporter's opset: one every supported onnxruntime release runs.
OPSET = 17


@functools.lru_cache(maxsize=None)
def onnxruntime_available() -> bool:
    """True when onnxruntime and onnx (the exporter writes through it) import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(reference: nn.Module, x: torch.Tensor) -> bytes:
    """The ONNX model of `reference` (plain PyTorch modules, eval mode) at `x`'s shape, fp32.

    The TorchScript exporter (``dynamo=False``): it keeps the module paths in the node names
    (``/features/features.3/pointwise/Conv``), which per-layer profiles group by."""
    import warnings

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(reference.eval(), (x.contiguous(),), buf, input_names=["x"], output_names=["y"],
                          opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def make_session(model: bytes, threads: Optional[int] = None, profile_prefix: Optional[str] = None,
                 optimized_model_path: Optional[str] = None):
    """An InferenceSession on the CPU with the default options except the thread counts (see the
    module docstring); `profile_prefix` turns on ORT's profiler (per-node times in a JSON file),
    `optimized_model_path` saves the graph as ORT runs it (after its optimisations)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    so.inter_op_num_threads = 1
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_model_path is not None:
        so.optimized_model_filepath = optimized_model_path
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def make_ort_provider(reference: nn.Module, x: torch.Tensor, threads: Optional[int] = None,
                      session=None) -> Callable[[], torch.Tensor]:
    """A no-argument callable running `reference` on `x` in ONNX Runtime and returning a torch tensor.

    The input is converted to a contiguous NCHW numpy array once, outside the timed call (ONNX
    has no channels_last tensors; ORT picks its own layout inside the graph)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"the onnxruntime provider runs fp32 on the CPU, got {x.dtype} on {x.device}")
    if session is None:
        session = make_session(export_onnx(reference, x), threads)
    feed = {session.get_inputs()[0].name: x.contiguous().numpy()}

    def run() -> torch.Tensor:
        return torch.from_numpy(session.run(None, feed)[0])

    run.session = session  # for callers that profile or inspect it
    return run
