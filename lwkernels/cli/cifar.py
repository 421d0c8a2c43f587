"""CIFAR-10 from a local directory in its standard python-pickle format (nothing is downloaded).

The layout is that of ``cifar-10-python.tar.gz`` from the CIFAR-10 page, extracted::

    cifar-10-batches-py/
        data_batch_1 ... data_batch_5    training images, 10000 each
        test_batch                       test images
        batches.meta                     label_names

Each batch is a pickled dict with ``data`` (N x 3072 uint8, channel-major 3 x 32 x 32 rows) and
``labels`` (N ints). :func:`load_cifar10` accepts the ``cifar-10-batches-py`` directory itself or its
parent and raises :class:`DatasetError` (a ValueError) naming what is missing or malformed.
Pickles are read with a restricted unpickler that only rebuilds numpy arrays.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

DIRNAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)

#: Per-channel mean and standard deviation of the CIFAR-10 training images (0..1 scale).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

PathLike = Union[str, os.PathLike]


class DatasetError(ValueError):
    """The dataset directory is missing, incomplete or not in the CIFAR-10 python format."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: Optional[int]) -> "Split":
        return self if n is None else Split(self.images[:n], self.labels[:n])


@dataclass
class Cifar10:
    train: Split
    test: Split
    classes: List[str]
    root: Path


class _NumpyOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a numpy array")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    except Exception as e:  # unpickling garbage raises many kinds of errors
        raise DatasetError(f"{path} is not a CIFAR-10 python batch (unpickling failed: {e})") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} is not a CIFAR-10 python batch (expected a dict, got {type(obj).__name__})")
    # Batches pickled by Python 2 have bytes keys; re-pickled ones may have str keys.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def find_root(root: PathLike) -> Path:
    """The directory holding the batch files: `root` itself or `root`/cifar-10-batches-py."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset directory {root} does not exist; download cifar-10-python.tar.gz from the "
                           f"CIFAR-10 page and extract it (it contains {DIRNAME}/)")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is not a directory")
    candidates = [root, root / DIRNAME]
    for c in candidates:
        if (c / META_FILE).is_file() or (c / TRAIN_FILES[0]).is_file():
            missing = [n for n in (*TRAIN_FILES, TEST_FILE, META_FILE) if not (c / n).is_file()]
            if missing:
                raise DatasetError(f"incomplete CIFAR-10 directory {c}: missing {', '.join(missing)}")
            return c
    raise DatasetError(f"no CIFAR-10 batches in {root}: expected {', '.join((*TRAIN_FILES, TEST_FILE, META_FILE))} "
                       f"in it or in {root / DIRNAME}")


def load_batch(path: Path, num_classes: int) -> Split:
    d = _unpickle(path)
    for key in ("data", "labels"):
        if key not in d:
            raise DatasetError(f"{path} has no '{key}' entry (keys: {sorted(map(str, d))})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be an N x 3072 uint8 array, got {desc}")
    labels = np.asarray(d["labels"])
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: 'labels' must be {data.shape[0]} integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, *IMAGE_SHAPE).copy())
    return Split(images, torch.from_numpy(labels.astype(np.int64)))


def load_classes(path: Path) -> List[str]:
    meta = _unpickle(path)
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple)) or not names:
        raise DatasetError(f"{path} has no 'label_names' list")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_cifar10(root: PathLike) -> Cifar10:
    """All of CIFAR-10 as uint8 tensors (about 180 MB)."""
    base = find_root(root)
    classes = load_classes(base / META_FILE)
    parts = [load_batch(base / name, len(classes)) for name in TRAIN_FILES]
    train = Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
    test = load_batch(base / TEST_FILE, len(classes))
    return Cifar10(train, test, classes, base)


def write_cifar10(root: PathLike, train: Tuple[np.ndarray, Sequence[int]], test: Tuple[np.ndarray, Sequence[int]],
                  classes: Sequence[str]) -> Path:
    """Write images (uint8 [N, 3, 32, 32] or [N, 3072]) and labels in the CIFAR-10 python format
    under `root`/cifar-10-batches-py (training images split over the five batches). For tests and
    for packaging one's own small data sets the same way."""
    base = Path(root) / DIRNAME
    base.mkdir(parents=True, exist_ok=True)

    def dump(name: str, payload: dict) -> None:
        with open(base / name, "wb") as f:
            pickle.dump(payload, f, protocol=2)

    def batch(label: str, images: np.ndarray, labels: Sequence[int]) -> dict:
        images = np.asarray(images, dtype=np.uint8).reshape(len(labels), 3072)
        return {b"batch_label": label.encode(), b"labels": [int(v) for v in labels], b"data": images,
                b"filenames": [f"{i}.png".encode() for i in range(len(labels))]}

    images, labels = np.asarray(train[0]), list(train[1])
    chunks = np.array_split(np.arange(len(labels)), len(TRAIN_FILES))
    for i, (name, idx) in enumerate(zip(TRAIN_FILES, chunks)):
        dump(name, batch(f"training batch {i + 1} of 5", images[idx], [labels[j] for j in idx]))
    dump(TEST_FILE, batch("testing batch 1 of 1", np.asarray(test[0]), list(test[1])))
    dump(META_FILE, {b"label_names": [c.encode() for c in classes], b"num_cases_per_batch": len(chunks[0]),
                     b"num_vis": 3072})
    return base
