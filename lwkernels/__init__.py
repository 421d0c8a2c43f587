"""lwkernels: fused depthwise-separable joint blocks for PyTorch.

    from lwkernels import JointBlock
    block = JointBlock(32, 64, stride=1, dilation=3).eval()
    y = block(x)            # one fused torch.ops.lwkernels.joint_block call

See README.md for conventions (dilation, stride, padding) and the op's exact semantics.
"""
import torch

from .ops import inference_backward as _autograd  # noqa: F401  (registers the op's backward)
from .ops import training as _training  # noqa: F401  (registers the training ops)
from .ops import inverted_residual_backward as _ir_autograd  # noqa: F401  (registers that op's backward)
from .nn.block import JointBlock, check_joint_modules
from .nn.chain import JointChain
from .nn.conv_bn_act import ConvBNAct
from .nn.inverted_residual import InvertedResidual, InvertedResidualReference
from .nn.layout_sequential import LayoutSequential
from .cpu.backend import PACK_CACHE, native as _native, selected_isa
from .triton.backend import register_cuda_kernel
from .nn.fuse import FuseReport, fuse, to_reference
from .ops.inference import joint_block
from .ops.inverted_residual import inverted_residual, inverted_residual_reference
from .ops.onnx import onnx_translation_table, register_symbolic as _register_onnx_symbolic
from .cpu.prepared_call import invalidate_all as _invalidate_prepared_calls
from .cpu.prepared_chain import invalidate_all as _invalidate_prepared_chains
from .cpu.prepared_classifier import invalidate_all as _invalidate_prepared_classifiers
from .cpu.prepared_dense_conv import invalidate_all as _invalidate_dense_convs
from .cpu.prepared_head import invalidate_all as _invalidate_prepared_heads
from .cpu.prepared_inverted_residual import invalidate_all as _invalidate_inverted_residuals
from .cpu.prepared_sequence import invalidate_all as _invalidate_prepared_sequences
from .ops.reference import JointBlockReference, joint_block_reference

__version__ = "0.1.0"

# The Triton kernel becomes the op's CUDA implementation where a GPU and Triton are present; without
# them CUDA tensors (if any) get the reference composition. Triton is imported only then.
if torch.cuda.is_available():
    register_cuda_kernel()

# torch.onnx.export(..., dynamo=False) translates the op through this symbolic; the default exporter
# takes onnx_translation_table() (JointBlock needs neither: it exports as its plain composition).
_register_onnx_symbolic()


def _trim_output_cache() -> None:
    _native().trim_output_pool()


def clear_cache() -> None:
    """Forget every packed weight, prepared call, chain and sequence (with their buffers), and free the
    output buffers kept for reuse (cpu/outputs.py); needed only after writing parameters through
    `.data`, which bypasses version counters, or to free memory."""
    PACK_CACHE.clear()
    _invalidate_prepared_calls()
    _invalidate_prepared_chains()
    _invalidate_dense_convs()
    _invalidate_prepared_heads()
    _invalidate_inverted_residuals()
    _invalidate_prepared_sequences()
    _invalidate_prepared_classifiers()
    _trim_output_cache()


__all__ = [
    "ConvBNAct",
    "JointBlock",
    "LayoutSequential",
    "JointChain",
    "FuseReport",
    "InvertedResidual",
    "InvertedResidualReference",
    "JointBlockReference",
    "check_joint_modules",
    "clear_cache",
    "fuse",
    "inverted_residual",
    "inverted_residual_reference",
    "joint_block",
    "joint_block_reference",
    "onnx_translation_table",
    "selected_isa",
    "to_reference",
    "__version__",
]
