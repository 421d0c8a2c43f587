"""Border-heavy shapes through every Triton kernel, for compute-sanitizer memcheck.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python benchmarks/gpu_memcheck_cases.py

Each shape's dilated kernel is larger than the image (most taps fall outside it), channel counts
cross the tiles, and the last pixel tile is partial, so the masks are what keeps every access in
bounds. With PyTorch's caching allocator off every tensor is its own allocation, exactly sized, so an
access one element past a tensor is reported. The results (fp32, full-precision dots) are also
compared with the reference composition in float64, so a masked-out element that should have counted
fails too. (Not with an fp32 reference on the GPU: cuDNN may run its convolutions in TF32, whose
error is above this check's tolerance.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import lwkernels  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the tree this file is in
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

#: (n, c_in, c_out, h, w, kernel, stride, dilation, padding)
SHAPES = (
    (3, 17, 33, 5, 7, 3, 2, 5, (5, 4)),      # taps mostly outside a 5 x 7 image, asymmetric padding
    (2, 33, 17, 9, 3, 5, 1, 2, (4, 4)),      # a 3-pixel-wide image, 5x5 taps
    (1, 3, 260, 1, 1, 3, 1, 3, (3, 3)),      # one pixel, C_out past a 256-wide tile
    (2, 5, 200, 6, 5, 3, 1, 1, (1, 1)),      # C_out past 128: 32-pixel candidate tiles, 60 pixels = 2 of them
)


def check(tile_config_of, device: str = "cuda") -> int:
    from lwkernels.ops.reference import joint_block_reference
    from lwkernels.triton.dw_backward import depthwise_backward_triton
    from lwkernels.triton.joint_block import (depthwise_stats_triton, joint_block_triton, pointwise_stats_triton,
                                              select_configs)

    g = torch.Generator(device=device).manual_seed(0)
    failures = 0
    for n, c_in, c_out, h, w, k, s, d, pad in SHAPES:
        for channels_last in (False, True):
            def rand(*shape):
                return torch.randn(*shape, generator=g, device=device)

            x = rand(n, c_in, h, w)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            dw, pw = rand(c_in, 1, k, k), rand(c_out, c_in, 1, 1)
            dw_scale, dw_shift, pw_scale, pw_shift = rand(c_in), rand(c_in), rand(c_out), rand(c_out)
            oh, ow = (h + 2 * pad[0] - d * (k - 1) - 1) // s + 1, (w + 2 * pad[1] - d * (k - 1) - 1) // s + 1
            res = rand(n, c_out, oh, ow)
            args = [x, dw, dw_scale, dw_shift, "relu", pw, pw_scale, pw_shift, res, "relu6", [s, s], list(pad), [d, d]]
            ref = joint_block_reference(*_float64(args))
            for tile in select_configs(c_in, c_out)[:2]:
                y = joint_block_triton(*args, allow_tf32=False, config=tile_config_of(tile))
                failures += _close(f"inference {tile} {x.shape} cl={channels_last}", y, ref)
            z, mean, var = pointwise_stats_triton(x, dw, dw_scale, dw_shift, "relu", pw, pw_shift, [s, s], list(pad),
                                                  [d, d], allow_tf32=False)
            z_ref = joint_block_reference(*_float64([x, dw, dw_scale, dw_shift, "relu", pw, None, pw_shift, None,
                                                     "none", [s, s], list(pad), [d, d]]))
            failures += _close(f"training forward {x.shape} cl={channels_last}", z, z_ref)
            failures += _close("its mean", mean.float(), z_ref.double().mean((0, 2, 3)).float())
            dmean, dvar = depthwise_stats_triton(x, dw, [s, s], list(pad), [d, d])
            c = torch.nn.functional.conv2d(x.double(), dw.double(), None, s, pad, d, c_in)
            failures += _close("depthwise statistics", dvar.float(), c.var((0, 2, 3), unbiased=False).float())
            grad = rand(n, c_in, oh, ow)
            gx, gw = depthwise_backward_triton(grad, x, dw, [s, s], list(pad), [d, d])
            xr, wr = x.detach().double().requires_grad_(), dw.detach().double().requires_grad_()
            torch.nn.functional.conv2d(xr, wr, None, s, pad, d, c_in).backward(grad.double())
            failures += _close("depthwise grad input", gx, xr.grad.float())
            failures += _close("depthwise grad weight", gw, wr.grad.float())
    if device == "cuda":
        torch.cuda.synchronize()
    return failures


def _float64(args):
    return [a.double() if isinstance(a, torch.Tensor) else a for a in args]


def _close(what: str, got: torch.Tensor, ref: torch.Tensor) -> int:
    got, ref = got.float(), ref.float()
    if got.shape != ref.shape or not torch.isfinite(got).all():
        print(f"FAIL {what}: shape {tuple(got.shape)} vs {tuple(ref.shape)} or non-finite values")
        return 1
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    if err > 1e-4 * scale:
        print(f"FAIL {what}: max error {err:.3e} (scale {scale:.3g})")
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the same checks under TRITON_INTERPRET=1 (tests this script without a GPU)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_memcheck_cases.py needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1).", file=sys.stderr)
        return 2
    from lwkernels.triton.joint_block import INTERPRET, tile_config

    if args.device == "cpu" and not INTERPRET:
        p.error("--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    failures = check(lambda tile: tile_config(*tile).all_kwargs(), args.device)
    print(f"memcheck cases: {len(SHAPES) * 2} shape x layout runs, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
