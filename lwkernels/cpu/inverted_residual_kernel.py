"""lwkernels::inverted_residual on CPU tensors: packs both 1x1 weights once per parameter version (the
packing cache), lays the tensors out densely and calls the native kernel (csrc/inverted_residual.h)."""
from __future__ import annotations

from typing import Tuple

import torch

from ..ops.args import InvertedResidualArgs
from ..ops.contract import empty_output, output_memory_format
from .backend import NATIVE_DTYPES, PACK_CACHE, address, computed_in_float32, native, selected_isa


def inverted_residual_cpu(args: InvertedResidualArgs, out_shape: Tuple[int, int, int, int]) -> torch.Tensor:
    """The op on CPU tensors; `args` are already checked (contract.check_inverted_residual_args), which
    returned `out_shape`."""
    x = args.x
    if x.dtype not in NATIVE_DTYPES:
        return computed_in_float32(inverted_residual_cpu, args, out_shape)
    memory_format = output_memory_format(x)
    layout = "nhwc" if memory_format == torch.channels_last else "nchw"
    y = empty_output(x, out_shape)
    if y.numel() == 0:
        return y
    isa = selected_isa()
    expand = PACK_CACHE.get(args.expand_weight, isa, layout)
    project = PACK_CACHE.get(args.pw_weight, isa, layout)
    x = x.contiguous(memory_format=memory_format)
    dw = args.dw_weight.contiguous()
    v = [None if t is None else t.contiguous() for t in (args.expand_scale, args.expand_shift, args.dw_scale,
                                                         args.dw_shift, args.pw_scale, args.pw_shift)]
    residual = None if args.residual is None else args.residual.contiguous(memory_format=memory_format)
    _C = native()
    n, c_in, h, w = x.shape
    geometry = _C.InvertedResidualGeometry(
        batch=n, in_channels=c_in, in_h=h, in_w=w, expanded_channels=args.expand_weight.shape[0],
        out_channels=out_shape[1], out_h=out_shape[2], out_w=out_shape[3], kernel_h=dw.shape[2], kernel_w=dw.shape[3],
        stride_h=args.stride[0], stride_w=args.stride[1], pad_h=args.padding[0], pad_w=args.padding[1],
        dil_h=args.dilation[0], dil_w=args.dilation[1], layout=layout)
    _C.inverted_residual_forward(
        expand, project, geometry, address(x), address(v[0]), address(v[1]), args.expand_act, address(dw),
        address(v[2]), address(v[3]), args.mid_act, address(v[4]), address(v[5]), address(residual), args.out_act,
        address(y), torch.get_num_threads())
    return y
