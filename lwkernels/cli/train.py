"""`lwkernels train` / `lwkernels eval`: train and evaluate the model zoo on CIFAR-10.

    lwkernels train --data ~/data/cifar10 --model lightweightnet --dilation 3 --width 1.0 \\
                    --input-size 224 --epochs 30 --batch-size 64 --lr 1e-3 --out runs/lwn
    lwkernels train --data ~/data/cifar10 --out runs/lwn --resume        # continue from the checkpoint
    lwkernels eval  --data ~/data/cifar10 --checkpoint runs/lwn/checkpoint.pt
    torchrun --nproc_per_node 4 -m lwkernels train --data ...            # DistributedDataParallel

The data directory is CIFAR-10 in its python-pickle format (see lwkernels/cli/cifar.py); nothing is
downloaded. The paper's options: --dilation (delta), --width (alpha), --input-size (rho x 224;
images are resized on the fly, bilinear), Adam (--optimizer), --epochs, --batch-size, --lr.

A run directory (--out) receives ``checkpoint.pt`` (the latest epoch: model, optimizer and
scheduler state, history; --resume continues from it), ``best.pt`` (best test accuracy),
``metrics.json`` (configuration and per-epoch train/test loss and accuracy) and ``curves.png``
(with matplotlib; a progress bar with tqdm: both in the optional `train` extra).

Under torchrun (WORLD_SIZE > 1) every process trains on its DistributedSampler share of each epoch
with DistributedDataParallel (nccl on CUDA, gloo on CPU); --batch-size is per process; metrics are
reduced over all processes and only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

CHECKPOINT_FORMAT = "lwkernels-train-1"
MODEL_OPTIONS = ("width_mult", "dilation", "method")


# -- argument parsing ---------------------------------------------------------------------------

def register(subparsers) -> None:
    """Add the `train` and `eval` subcommands to an argparse subparsers object."""
    from ..models import MODELS

    t = subparsers.add_parser("train", help="train a model on CIFAR-10 (python-pickle format)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--data", required=True, help="CIFAR-10 directory (cifar-10-batches-py or its parent)")
    t.add_argument("--model", default="lightweightnet", choices=sorted(MODELS), help="default: lightweightnet")
    t.add_argument("--width", "--width-mult", dest="width_mult", type=float, default=1.0,
                   help="width multiplier alpha (paper: 1, 0.75, 0.5)")
    t.add_argument("--dilation", type=int, default=None,
                   help="depthwise dilation delta (default: the model's; LightweightNet 3, 1 = no dilation)")
    t.add_argument("--method", choices=("concat", "add"), default=None, help="MultiScaleNet merge (default concat)")
    t.add_argument("--input-size", type=int, default=32,
                   help="images are resized to this (the paper: 224, 192, 160; default 32 = native)")
    t.add_argument("--epochs", type=int, default=20, help="total epochs (a resumed run continues up to this)")
    t.add_argument("--batch-size", type=int, default=64, help="per process")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="adam (the paper) or sgd")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--schedule", choices=("none", "cosine"), default="none", help="learning-rate schedule")
    t.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crop (pad 4) + horizontal flip")
    t.add_argument("--out", default=None, help="run directory (default: runs/MODEL)")
    t.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default: OUT/checkpoint.pt)")
    t.add_argument("--limit-train", type=int, default=None, metavar="N", help="use the first N training images")
    t.add_argument("--limit-test", type=int, default=None, metavar="N", help="use the first N test images")
    _common_options(t)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(run=run_train)

    e = subparsers.add_parser("eval", help="evaluate a trained checkpoint on the CIFAR-10 test set")
    e.add_argument("--data", required=True, help="CIFAR-10 directory (cifar-10-batches-py or its parent)")
    e.add_argument("--checkpoint", required=True, help="checkpoint.pt / best.pt written by `lwkernels train`")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--limit-test", type=int, default=None, metavar="N", help="use the first N test images")
    e.add_argument("--reference", action="store_true",
                   help="run the plain PyTorch composition instead of the fused JointBlocks")
    e.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    _common_options(e)
    e.set_defaults(run=run_eval)


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--quiet", action="store_true", help="no progress indicator")


def main(argv: Optional[List[str]] = None) -> int:
    """Run `train ...` or `eval ...` (for tests and ``python -m lwkernels.cli.train``)."""
    parser = argparse.ArgumentParser(prog="lwkernels")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"lwkernels {args.command}: error: {e}", file=sys.stderr)
        return 2


# -- distributed set-up -------------------------------------------------------------------------

class Context:
    """Device and process-group facts of this process."""

    def __init__(self, device_arg: str, threads: Optional[int]) -> None:
        import torch
        import torch.distributed as dist

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        if device_arg.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda requested but CUDA is not available")
            if self.world_size > 1:
                device_arg = f"cuda:{local_rank}"
            torch.cuda.set_device(torch.device(device_arg))
        elif device_arg != "cpu":
            raise ValueError(f"--device must be cpu, cuda or auto, got {device_arg!r}")
        self.device = torch.device(device_arg)
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--threads must be positive, got {threads}")
            torch.set_num_threads(threads)
        self.distributed = self.world_size > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: List[float]) -> List[float]:
        """Element-wise sum over processes (float64)."""
        import torch
        import torch.distributed as dist

        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# -- data ---------------------------------------------------------------------------------------

def preprocess(images, input_size: int, augment: bool, device, generator=None):
    """uint8 [N, 3, 32, 32] -> normalised float [N, 3, S, S] on `device`: optional random crop
    (padding 4) + horizontal flip at 32 x 32, then bilinear resize to `input_size`."""
    import torch
    import torch.nn.functional as F

    from .cifar import MEAN, STD

    x = images.to(device, non_blocking=True).float().div_(255)
    if augment:  # vectorised: one gather picks every image's crop (and flip)
        n, _, h, w = x.shape
        padded = F.pad(x, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (n,), generator=generator).to(device)
        dx = torch.randint(0, 9, (n,), generator=generator).to(device)
        flip = (torch.rand(n, generator=generator) < 0.5).to(device)
        ar_h, ar_w = torch.arange(h, device=device), torch.arange(w, device=device)
        rows = dy[:, None] + ar_h
        cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)
        x = padded[torch.arange(n, device=device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2).contiguous()  # the gather gives [N, H, W, C]
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return x


def _load_data(path: str, limit_train: Optional[int], limit_test: Optional[int]):
    try:
        from .cifar import load_cifar10
    except ImportError as e:  # numpy comes with the optional `train` extra
        raise SystemExit(f"lwkernels train/eval needs {e.name}: pip install 'lwkernels[train]'") from e

    data = load_cifar10(path)
    for name, n in (("--limit-train", limit_train), ("--limit-test", limit_test)):
        if n is not None and n < 1:
            raise ValueError(f"{name} must be positive, got {n}")
    data.train, data.test = data.train.head(limit_train), data.test.head(limit_test)
    if len(data.train) == 0 or len(data.test) == 0:
        raise ValueError(f"{data.root}: empty training or test split")
    return data


# -- progress -----------------------------------------------------------------------------------

class Progress:
    """A progress bar on stderr (tqdm, from the optional `train` extra) plus one summary line per
    epoch; without tqdm only the summary lines are printed."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self._tqdm = tqdm

    def update(self, label: str, step: int, total: int, extra: str = "") -> None:
        if not self.enabled or self._tqdm is None:
            return
        if self._bar is None or self._bar.desc != label:
            self._close_bar()
            self._bar = self._tqdm(total=total, desc=label, file=sys.stderr, leave=False, dynamic_ncols=True)
        self._bar.n = step
        self._bar.set_postfix_str(extra, refresh=False)
        self._bar.refresh()

    def done(self, summary: str = "") -> None:
        self._close_bar()
        if self.enabled and summary:
            print(summary, file=sys.stderr, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# -- evaluation ---------------------------------------------------------------------------------

def evaluate(model, split, ctx: Context, input_size: int, batch_size: int, progress: Optional[Progress] = None,
             label: str = "test") -> Dict[str, float]:
    """Loss and accuracy of `model` (eval mode) on `split`, each process taking every
    world_size-th image and the sums reduced over processes (exact, no padding)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    idx = torch.arange(ctx.rank, len(split), ctx.world_size)
    loss_sum = correct = 0.0
    steps = max(1, math.ceil(len(idx) / batch_size))
    with torch.inference_mode():
        for step, start in enumerate(range(0, len(idx), batch_size), 1):
            b = idx[start:start + batch_size]
            x = preprocess(split.images[b], input_size, False, ctx.device)
            y = split.labels[b].to(ctx.device)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            if progress is not None:
                progress.update(label, step, steps)
    loss_sum, correct, count = ctx.all_sum([loss_sum, correct, float(len(idx))])
    return {"loss": loss_sum / count, "acc": correct / count, "count": int(count)}


# -- checkpoints, metrics -----------------------------------------------------------------------

def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(path: Path, payload: dict) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    _atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str, map_location="cpu") -> dict:
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{p} is not a readable checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{p} is not a checkpoint written by `lwkernels train`")
    return ckpt


def build_from_checkpoint(ckpt: dict):
    from ..models import build_model

    model = build_model(ckpt["model"], num_classes=ckpt["num_classes"], **ckpt["model_options"])
    model.load_state_dict(ckpt["model_state"])
    return model


def _json_safe(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), list, tuple))}


# -- train --------------------------------------------------------------------------------------

def run_train(args) -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from ..models import build_model, count_parameters
    from .plotting import plotting_available, write_training_curves

    for name in ("epochs", "batch_size", "input_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    data = _load_data(args.data, args.limit_train, args.limit_test)  # before the process group: clear errors
    ctx = Context(args.device, args.threads)
    try:
        out = Path(args.out or os.path.join("runs", args.model))
        ckpt = None
        if args.resume is not None:
            resume_path = out / "checkpoint.pt" if args.resume == "auto" else Path(args.resume)
            ckpt = load_checkpoint(str(resume_path))
        if ckpt is not None:  # the model is the checkpoint's, whatever the command line says
            model_name, model_options, input_size = ckpt["model"], ckpt["model_options"], ckpt["input_size"]
            if ckpt["num_classes"] != len(data.classes):
                raise ValueError(f"checkpoint has {ckpt['num_classes']} classes, the dataset {len(data.classes)}")
        else:
            model_name, input_size = args.model, args.input_size
            model_options = {k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k) is not None}
        torch.manual_seed(args.seed)
        model = build_model(model_name, num_classes=len(data.classes), **model_options).to(ctx.device)
        if args.optimizer == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs) if args.schedule == "cosine"
                 else torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0))
        history: List[dict] = []
        start_epoch, best_acc = 0, -1.0
        if ckpt is not None:
            model.load_state_dict(ckpt["model_state"])
            opt.load_state_dict(ckpt["optimizer_state"])
            sched.load_state_dict(ckpt["scheduler_state"])
            history, start_epoch = list(ckpt["history"]), int(ckpt["epoch"])
            best_acc = max((h["test_acc"] for h in history), default=-1.0)
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) \
            if ctx.distributed else model

        dataset = TensorDataset(data.train.images, data.train.labels)
        sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed) \
            if ctx.distributed else None
        loader_gen = torch.Generator().manual_seed(args.seed)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                            num_workers=args.workers, drop_last=False, generator=loader_gen,
                            pin_memory=ctx.device.type == "cuda")
        aug_gen = torch.Generator().manual_seed(args.seed * 1000 + ctx.rank)
        if ckpt is not None and ctx.world_size == 1 and "rng" in ckpt:  # resume exactly where it stopped
            torch.set_rng_state(ckpt["rng"]["torch"])
            loader_gen.set_state(ckpt["rng"]["loader"])
            aug_gen.set_state(ckpt["rng"]["augment"])
        if ctx.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        progress = Progress(ctx.main and not args.quiet)
        config = {
            "model": model_name, "model_options": model_options, "num_classes": len(data.classes),
            "parameters": count_parameters(model), "input_size": input_size, "world_size": ctx.world_size,
            "device": str(ctx.device), "train_images": len(data.train), "test_images": len(data.test),
            "args": _json_safe(vars(args)),
        }
        if ctx.main:
            out.mkdir(parents=True, exist_ok=True)
            print(f"lwkernels train: {model_name} {model_options}, {config['parameters']:,} parameters, "
                  f"input {input_size}, {len(data.train)} training / {len(data.test)} test images, "
                  f"{ctx.world_size} process(es) on {ctx.device}" +
                  (f", resuming after epoch {start_epoch}" if ckpt is not None else ""), file=sys.stderr)
        if start_epoch >= args.epochs and ctx.main:
            print(f"already trained for {start_epoch} epochs (--epochs {args.epochs}); nothing to do", file=sys.stderr)

        for epoch in range(start_epoch, args.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            net.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
            correct = torch.zeros((), dtype=torch.float64, device=ctx.device)
            seen, steps = 0, len(loader)
            for step, (images, labels) in enumerate(loader, 1):
                x = preprocess(images, input_size, args.augment, ctx.device, aug_gen)
                y = labels.to(ctx.device, non_blocking=True)
                logits = net(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach().double() * y.shape[0]
                correct += (logits.detach().argmax(1) == y).sum().double()
                seen += y.shape[0]
                if progress.enabled and (step == steps or step % max(1, steps // 50) == 0):
                    progress.update(f"epoch {epoch + 1}/{args.epochs}", step, steps,
                                    f"loss {loss_sum.item() / seen:.4f}")
            sched.step()
            train_loss, train_correct, train_seen = ctx.all_sum([loss_sum.item(), correct.item(), float(seen)])
            _sync_buffers(model, ctx)  # BN running statistics of rank 0 everywhere: the model we evaluate and save
            train_time = time.perf_counter() - t0
            test = evaluate(model, data.test, ctx, input_size, max(args.batch_size, 128),
                            progress if ctx.main and not args.quiet else None, f"epoch {epoch + 1} test")
            record = {
                "epoch": epoch + 1, "train_loss": train_loss / train_seen, "train_acc": train_correct / train_seen,
                "test_loss": test["loss"], "test_acc": test["acc"], "lr": opt.param_groups[0]["lr"],
                "epoch_time_s": train_time, "train_images_per_s": train_seen / train_time,
            }
            history.append(record)
            progress.done(f"epoch {epoch + 1}/{args.epochs}: train loss {record['train_loss']:.4f} acc "
                          f"{100 * record['train_acc']:.2f}% | test loss {record['test_loss']:.4f} acc "
                          f"{100 * record['test_acc']:.2f}% | {train_time:.1f}s")
            if ctx.main:
                payload = {
                    "format": CHECKPOINT_FORMAT, "model": model_name, "model_options": model_options,
                    "num_classes": len(data.classes), "classes": data.classes, "input_size": input_size,
                    "epoch": epoch + 1, "model_state": model.state_dict(), "optimizer_state": opt.state_dict(),
                    "scheduler_state": sched.state_dict(), "history": history,
                    "rng": {"torch": torch.get_rng_state(), "loader": loader_gen.get_state(),
                            "augment": aug_gen.get_state()},
                }
                save_checkpoint(out / "checkpoint.pt", payload)
                if record["test_acc"] > best_acc:
                    best_acc = record["test_acc"]
                    save_checkpoint(out / "best.pt", payload)
                metrics = dict(config, epochs=history, best_test_acc=best_acc,
                               best_epoch=max(history, key=lambda h: h["test_acc"])["epoch"])
                _atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
                if plotting_available():
                    write_training_curves(out / "curves.png", history, title=model_name)
            ctx.barrier()
        if ctx.main:
            files = "checkpoint.pt, best.pt, metrics.json" + (", curves.png" if plotting_available() else "")
            print(f"run directory: {out} ({files})", file=sys.stderr)
            if not plotting_available():
                print("curves.png not written: matplotlib is not installed (pip install 'lwkernels[train]')",
                      file=sys.stderr)
        return 0
    finally:
        ctx.close()


def _sync_buffers(model, ctx: Context) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b, 0)


# -- eval ---------------------------------------------------------------------------------------

def run_eval(args) -> int:
    from ..models import to_reference

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    ckpt = load_checkpoint(args.checkpoint)
    data = _load_data(args.data, None, args.limit_test)
    if len(data.classes) != ckpt["num_classes"]:
        raise ValueError(f"checkpoint has {ckpt['num_classes']} classes, the dataset {len(data.classes)}")
    ctx = Context(args.device, args.threads)
    try:
        model = build_from_checkpoint(ckpt)
        if args.reference:
            model = to_reference(model)
        model = model.to(ctx.device).eval()
        progress = Progress(ctx.main and not args.quiet)
        t0 = time.perf_counter()
        result = evaluate(model, data.test, ctx, ckpt["input_size"], args.batch_size, progress, "eval")
        seconds = time.perf_counter() - t0
        progress.done()
        result.update(model=ckpt["model"], model_options=ckpt["model_options"], input_size=ckpt["input_size"],
                      epoch=ckpt["epoch"], path="reference" if args.reference else "fused", seconds=seconds,
                      images_per_s=result["count"] / seconds, device=str(ctx.device), world_size=ctx.world_size,
                      checkpoint=str(args.checkpoint))
        if ctx.main:
            print(f"{ckpt['model']} (epoch {ckpt['epoch']}, {result['path']}): test accuracy "
                  f"{100 * result['acc']:.2f}% ({round(result['acc'] * result['count'])}/{result['count']}), "
                  f"loss {result['loss']:.4f}, {result['images_per_s']:.0f} images/s on {ctx.device}")
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
