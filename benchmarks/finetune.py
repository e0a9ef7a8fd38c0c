"""Repair only vs repair + distillation fine-tuning on the MNIST sample, at several pruning ratios.

For each ratio: compress the sample (spline criterion, layerwise, least-squares repair, channels rounded to 8),
measure val accuracy of the slim model, fine-tune it for N epochs on samples/mnist_train.npz by distillation
from the original (plus cross-entropy with the labels), and measure again. Prints one table; the goal (issue 7)
is to be within 1 point of the original at ratio 0.7.

    python benchmarks/finetune.py [--epochs 10] [--ratios 0.5 0.7 0.9] [--out /tmp/finetune_bench]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from splinecompress.compress import compress  # noqa: E402
from splinecompress.finetune import DEFAULT_EPOCHS, finetune  # noqa: E402
from splinecompress.report import render_table  # noqa: E402

SAMPLES = REPO / "samples"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"fine-tuning epochs (default {DEFAULT_EPOCHS})"
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/finetune_bench", help="folder for the slim models")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    original = SAMPLES / "mnist_cnn.onnx"

    rows = []
    original_accuracy = None
    for ratio in args.ratios:
        slim = out / f"slim_{ratio:g}.onnx"
        t0 = time.perf_counter()
        result = compress(original, SAMPLES / "mnist_calib.npz", slim, ratio=ratio, val=SAMPLES / "mnist_val.npz",
                          measure_latency=False, seed=args.seed)  # fmt: skip
        compress_s = time.perf_counter() - t0
        report = result.validation
        original_accuracy = report.reference.accuracy
        tuned = finetune(slim, original, SAMPLES / "mnist_train.npz", out / f"slim_{ratio:g}_ft.onnx",
                         val=SAMPLES / "mnist_val.npz", epochs=args.epochs, seed=args.seed)  # fmt: skip
        rows.append(
            (
                f"{ratio:g}",
                f"{report.model.params / report.reference.params:.1%}",
                f"{report.model.accuracy:.2%}",
                f"{tuned.val_accuracy_after:.2%}",
                f"{(tuned.val_accuracy_after - original_accuracy) * 100:+.2f}",
                f"{report.reference.accuracy:.2%}",
                f"{tuned.train_seconds:.1f}",
                f"{compress_s:.1f}",
            )
        )
        print(f"ratio {ratio:g} done", file=sys.stderr, flush=True)

    header = ("ratio", "params kept", "repair only", f"+ fine-tune ({args.epochs} ep)", "vs original (pt)",
              "original", "fine-tune s", "compress s")  # fmt: skip
    print(render_table(rows, header))
    print(
        f"\nMNIST sample: val {SAMPLES / 'mnist_val.npz'} (1000 digits), fine-tuning on {SAMPLES / 'mnist_train.npz'} "
        f"(3500 digits with labels), distillation T=4 + CE alpha 0.5, Adam with cosine decay, batch 64, 1 torch "
        f"thread, seed {args.seed}; compress: spline, layer, lstsq repair, round to 8."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
