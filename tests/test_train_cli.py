"""`lwkernels train` / `lwkernels eval` end to end on a tiny synthetic CIFAR-format dataset."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lwkernels
from lwkernels.cli.cifar import DIRNAME, DatasetError, load_cifar10, write_cifar10
from lwkernels.cli.train import main, preprocess
from lwkernels.cli.plotting import SIZE_PX, TEST_COLOR, TRAIN_COLOR, plotting_available

CLASSES = ["red", "green", "blue", "dark"]


def synthetic_images(n: int, seed: int):
    """Learnable classes: class k brightens channel k (class 3: all dark), plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    images = rng.integers(0, 90, (n, 3, 32, 32)).astype(np.uint8)
    for i, k in enumerate(labels):
        if k < 3:
            images[i, k] += 150
    return images, labels


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, synthetic_images(96, 0), synthetic_images(64, 1), CLASSES)
    return root


def train_args(data: Path, out: Path, epochs: int, *extra: str):
    return ["train", "--data", str(data), "--out", str(out), "--model", "lightweightnet", "--width", "0.25",
            "--epochs", str(epochs), "--batch-size", "32", "--lr", "3e-3", "--no-augment", "--device", "cpu",
            "--quiet", *extra]


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(train_args(dataset, out, 3)) == 0
    return out


def test_dataset_roundtrip(dataset):
    data = load_cifar10(dataset)
    assert len(data.train) == 96 and len(data.test) == 64 and data.classes == CLASSES
    images, labels = synthetic_images(96, 0)
    assert torch.equal(data.train.images, torch.from_numpy(images))
    assert data.train.labels.tolist() == labels.tolist()
    assert len(load_cifar10(dataset / DIRNAME).train) == 96  # the batches directory itself works too


def test_training_reduces_loss_and_writes_outputs(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    for e in epochs:
        assert {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s"} <= set(e)
        assert 0 <= e["test_acc"] <= 1 and np.isfinite(e["train_loss"])
    assert epochs[-1]["train_loss"] < 0.8 * epochs[0]["train_loss"]
    assert epochs[-1]["train_acc"] > 0.5  # 4 classes: chance is 0.25
    assert metrics["model"] == "lightweightnet" and metrics["model_options"]["width_mult"] == 0.25
    assert metrics["world_size"] == 1 and metrics["train_images"] == 96
    assert metrics["best_test_acc"] == max(e["test_acc"] for e in epochs)
    for name in ("checkpoint.pt", "best.pt"):
        assert (trained_run / name).is_file()

    if plotting_available():
        from matplotlib.colors import to_rgb
        from matplotlib.image import imread

        image = imread(trained_run / "curves.png")
        assert (image.shape[1], image.shape[0]) == SIZE_PX
        pixels = {tuple(p) for p in (image[..., :3] * 255).round().astype(int).reshape(-1, 3)}
        for color in (TRAIN_COLOR, TEST_COLOR):  # the train and test lines are drawn
            assert tuple(round(255 * c) for c in to_rgb(color)) in pixels, color
    else:
        assert not (trained_run / "curves.png").exists()


def test_resume_continues_exactly(dataset, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(train_args(dataset, straight, 2, "--limit-train", "32")) == 0
    assert main(train_args(dataset, resumed, 1, "--limit-train", "32")) == 0
    first = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 1
    assert main(train_args(dataset, resumed, 2, "--limit-train", "32", "--resume")) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert b["epoch"] == 2 and len(b["history"]) == 2
    assert b["history"][0] == first["history"][0]
    for k, v in a["model_state"].items():  # same data order, same optimizer state: the same run
        torch.testing.assert_close(b["model_state"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert not all(torch.equal(first["model_state"][k], v) for k, v in b["model_state"].items())
    assert len(json.loads((resumed / "metrics.json").read_text())["epochs"]) == 2


def test_eval_command_matches_training_metrics(dataset, trained_run, tmp_path, capsys):
    last = json.loads((trained_run / "metrics.json").read_text())["epochs"][-1]
    results = {}
    for flag in ([], ["--reference"]):
        out = tmp_path / f"eval{len(flag)}.json"
        argv = ["eval", "--data", str(dataset), "--checkpoint", str(trained_run / "checkpoint.pt"), "--device", "cpu",
                "--json", str(out), "--quiet", *flag]
        assert main(argv) == 0
        results[bool(flag)] = json.loads(out.read_text())
    assert "test accuracy" in capsys.readouterr().out
    fused, reference = results[False], results[True]
    assert fused["path"] == "fused" and reference["path"] == "reference" and fused["count"] == 64
    assert fused["acc"] == pytest.approx(last["test_acc"]) and fused["loss"] == pytest.approx(last["test_loss"], rel=1e-5)
    assert reference["acc"] == pytest.approx(fused["acc"]) and reference["loss"] == pytest.approx(fused["loss"], rel=1e-4)


def test_other_models_train_by_name(dataset, tmp_path):
    out = tmp_path / "ms"
    argv = ["train", "--data", str(dataset), "--out", str(out), "--model", "multiscalenet", "--method", "add",
            "--width", "0.25", "--epochs", "1", "--batch-size", "32", "--limit-train", "32", "--limit-test", "32",
            "--input-size", "40", "--optimizer", "sgd", "--lr", "0.05", "--schedule", "cosine", "--quiet"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "multiscalenet" and metrics["model_options"]["method"] == "add"
    assert metrics["input_size"] == 40 and metrics["test_images"] == 32


def test_preprocess_resizes_and_augments():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert preprocess(images, 224, False, "cpu").shape == (3, 3, 224, 224)
    plain = preprocess(images, 32, False, "cpu")
    g = torch.Generator().manual_seed(0)
    aug = preprocess(images, 32, True, "cpu", g)
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4), value=float("nan"))
    for i in range(3):  # every augmented image is a (possibly flipped) window of the zero-padded image
        raw = torch.nn.functional.pad(images[i].float() / 255, (4, 4, 4, 4))
        found = False
        for dy in range(9):
            for dx in range(9):
                window = raw[:, dy:dy + 32, dx:dx + 32]
                for cand in (window, window.flip(-1)):
                    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
                    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
                    found |= torch.allclose((cand - mean) / std, aug[i], atol=1e-6)
        assert found, i
    assert padded.shape[-1] == 40


def run_cli(*argv):
    return main(list(argv))


def test_clear_errors_for_bad_dataset_directories(dataset, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert run_cli("train", "--data", str(missing), "--out", str(tmp_path / "o")) == 2
    assert "does not exist" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no CIFAR-10 batches"):
        load_cifar10(empty)

    def broken_copy(name: str) -> Path:
        root = tmp_path / name
        (root / DIRNAME).mkdir(parents=True)
        for f in (dataset / DIRNAME).iterdir():
            (root / DIRNAME / f.name).write_bytes(f.read_bytes())
        return root / DIRNAME

    incomplete = broken_copy("incomplete")
    (incomplete / "test_batch").unlink()
    with pytest.raises(DatasetError, match="missing test_batch"):
        load_cifar10(incomplete.parent)

    garbage = broken_copy("garbage")
    (garbage / "data_batch_3").write_bytes(b"this is not a pickle")
    assert run_cli("train", "--data", str(garbage), "--out", str(tmp_path / "o")) == 2
    assert "data_batch_3 is not a CIFAR-10 python batch" in capsys.readouterr().err

    bad_shape = broken_copy("shape")
    with open(bad_shape / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f, protocol=2)
    with pytest.raises(DatasetError, match="N x 3072 uint8"):
        load_cifar10(bad_shape)

    bad_labels = broken_copy("labels")
    with open(bad_labels / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 7]}, f, protocol=2)
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 4\)"):
        load_cifar10(bad_labels)

    hostile = broken_copy("hostile")
    with open(hostile / "data_batch_1", "wb") as f:
        pickle.dump({b"data": os.getcwd}, f, protocol=2)  # any non-numpy global is refused, never called
    with pytest.raises(DatasetError, match="refusing to load"):
        load_cifar10(hostile)

    assert run_cli("eval", "--data", str(dataset), "--checkpoint", str(tmp_path / "none.pt")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ddp_two_processes_gloo(dataset, tmp_path):
    """torchrun with 2 CPU processes: DistributedDataParallel over gloo, rank 0 writes the run."""
    out = tmp_path / "ddp"
    env = dict(os.environ)
    package_root = str(Path(lwkernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lwkernels.cli.train", *train_args(dataset, out, 1, "--threads", "1")]
    # From the checkout's root, `-m` would import the source tree's lwkernels/ (no compiled _C).
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["epochs"]) == 1
    assert metrics["epochs"][0]["test_acc"] >= 0 and np.isfinite(metrics["epochs"][0]["train_loss"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["model_state"])
    # The 2-process test metrics were reduced over both shards: evaluating the saved model alone agrees.
    assert main(["eval", "--data", str(dataset), "--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu",
                 "--json", str(tmp_path / "e.json"), "--quiet"]) == 0
    single = json.loads((tmp_path / "e.json").read_text())
    assert single["count"] == 64
    assert single["acc"] == pytest.approx(metrics["epochs"][0]["test_acc"])
    assert single["loss"] == pytest.approx(metrics["epochs"][0]["test_loss"], rel=1e-5)
