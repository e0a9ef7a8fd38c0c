"""`splinecompress compress model.onnx --calib calib.npz -o slim.onnx`: the main job in one command."""

from __future__ import annotations

import argparse

from splinecompress.calib.runner import DEVICES
from splinecompress.criteria import CRITERIA
from splinecompress.policy import DEFAULT_MIN_KEEP, SCOPES
from splinecompress.repair import REPAIRS

NAME = "compress"
HELP = "analyze, plan, repair, prune, verify and validate in one go; prints a before/after table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from splinecompress.compress import DEFAULT_RATIO, DEFAULT_ROUND_TO

    parser.add_argument("model", help="ONNX file")
    parser.add_argument("--calib", required=True, help="calibration data: .npz file or folder of .npy/.npz files")
    parser.add_argument("-o", "--output", required=True, help="slim ONNX file to write")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help=f"fraction of prunable channels removed (default {DEFAULT_RATIO})")
    budget.add_argument("--flops-target", type=float, help="fraction of FLOPs to keep, in (0, 1]")
    parser.add_argument("--criterion", choices=sorted(CRITERIA), default="spline", help="default: spline")
    parser.add_argument("--scope", choices=SCOPES, default="layer", help="default: layer")
    parser.add_argument("--repair", choices=REPAIRS, default="lstsq", help="training-free repair (default: lstsq)")
    parser.add_argument(
        "--round-to",
        type=int,
        default=DEFAULT_ROUND_TO,
        help=f"keep channel counts multiples of N (default {DEFAULT_ROUND_TO}: CPU kernels are much faster so)",
    )
    parser.add_argument("--min-keep", type=float, default=DEFAULT_MIN_KEEP, help="global scope floor per group")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="GROUP_OR_NODE", help="groups to leave whole")
    parser.add_argument("--val", help="validation data (.npz with optional labels); default: the calibration data")
    gates = parser.add_mutually_exclusive_group()
    gates.add_argument("--min-agreement", type=float, help="exit 1 if top-1 agreement with the original is below A")
    gates.add_argument(
        "--max-accuracy-drop",
        type=float,
        help="exit 1 if accuracy falls more than D (a fraction: 0.01 = 1 point) below the original",
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="execution provider (default: auto)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per calibration run (default 32)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument("--report", help="write the report as JSON to this file")
    parser.add_argument("--seed", type=int, default=0, help="seed of random choices (random criterion, sampling)")
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="fine-tune the slim model by distillation for N epochs (needs --train)",
    )
    parser.add_argument("--train", help="training data for --finetune-epochs (.npz, labels optional)")


def run(args: argparse.Namespace) -> int:
    from splinecompress.compress import compress
    from splinecompress.report import format_compress, write_report_json

    result = compress(
        args.model,
        args.calib,
        args.output,
        ratio=args.ratio,
        flops_target=args.flops_target,
        criterion=args.criterion,
        scope=args.scope,
        repair=args.repair,
        round_to=args.round_to,
        min_keep=args.min_keep,
        exclude=tuple(args.exclude),
        val=args.val,
        min_agreement=args.min_agreement,
        max_accuracy_drop=args.max_accuracy_drop,
        device=args.device,
        batch_size=args.batch_size,
        measure_latency=not args.no_latency,
        seed=args.seed,
        show_progress=None,
        finetune_epochs=args.finetune_epochs,
        train=args.train,
    )
    print(format_compress(result, verbose=args.verbose))
    if args.report:
        write_report_json(result, args.report)
    return 0 if result.passed else 1
