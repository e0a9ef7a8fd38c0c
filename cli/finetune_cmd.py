"""`splinecompress finetune slim.onnx --teacher model.onnx --data train.npz [--val val.npz] -o out.onnx`."""

from __future__ import annotations

import argparse

from splinecompress.calib.runner import DEVICES

NAME = "finetune"
HELP = "fine-tune a slim model by distillation from the original (ONNX in, ONNX out; labels optional)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from splinecompress.finetune import (
        DEFAULT_ALPHA,
        DEFAULT_BATCH_SIZE,
        DEFAULT_EPOCHS,
        DEFAULT_LR,
        DEFAULT_TEMPERATURE,
        DEFAULT_THREADS,
    )

    parser.add_argument("model", help="the slim ONNX file to fine-tune (the student)")
    parser.add_argument("--teacher", required=True, help="the original ONNX file the slim model was pruned from")
    parser.add_argument(
        "--data", required=True, help="training data: .npz file or folder of .npy/.npz files (optional 'labels')"
    )
    parser.add_argument("--val", help="validation data, evaluated before training and after each epoch")
    parser.add_argument("-o", "--output", required=True, help="fine-tuned ONNX file to write (may be the input)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"default {DEFAULT_EPOCHS}")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"peak learning rate (default {DEFAULT_LR})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"default {DEFAULT_BATCH_SIZE}")
    parser.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help=f"distillation T (default {DEFAULT_TEMPERATURE})"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help=f"weight of cross-entropy with labels, distillation gets 1 - alpha (default {DEFAULT_ALPHA})",
    )
    parser.add_argument("--weight-decay", type=float, default=0.0, help="default 0")
    parser.add_argument(
        "--train-bn-stats", action="store_true", help="update BatchNorm running statistics (default: frozen)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of shuffling and torch (default 0)")
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help=f"torch threads (default {DEFAULT_THREADS})"
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="teacher's execution provider")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    from splinecompress.finetune import EPOCH_HEADER, epoch_rows, finetune
    from splinecompress.report import render_table, write_report_json

    result = finetune(
        args.model,
        args.teacher,
        args.data,
        args.output,
        val=args.val,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        temperature=args.temperature,
        alpha=args.alpha,
        weight_decay=args.weight_decay,
        freeze_bn=not args.train_bn_stats,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        show_progress=None,
    )
    print(render_table(epoch_rows(result), EPOCH_HEADER))
    print()
    labels = "with labels" if result.labelled else "distillation only"
    print(f"trained   {result.samples} samples, {labels}, {result.epochs} epochs in {result.train_seconds:.1f} s")
    if result.val_accuracy_after is not None:
        teacher = "" if result.teacher_val_accuracy is None else f" (teacher {result.teacher_val_accuracy:.2%})"
        print(f"val       accuracy {result.val_accuracy_before:.2%} -> {result.val_accuracy_after:.2%}{teacher}")
    print(f"written   {result.output} (export parity {result.export_max_abs_diff:.2g})")
    if args.json:
        print(f"wrote {write_report_json(result, args.json)}")
    return 0
