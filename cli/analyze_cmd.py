"""`splinecompress analyze model.onnx --calib calib.npz -o stats.npz`: spline statistics per group."""

from __future__ import annotations

import argparse

from splinecompress.calib.runner import DEVICES

NAME = "analyze"
HELP = "run calibration data through the model and save the spline statistics of every prunable group"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX file")
    parser.add_argument("--calib", required=True, help="calibration data: .npz file or folder of .npy/.npz files")
    parser.add_argument("-o", "--output", required=True, help="statistics file to write (.npz)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per run (default 32)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="execution provider (default: auto)")
    parser.add_argument(
        "--max-positions",
        type=int,
        default=None,
        help="subsample at most N positions per probe tensor per batch (huge feature maps)",
    )


def run(args: argparse.Namespace) -> int:
    from splinecompress.calib.calibrate import calibrate
    from splinecompress.graph.groups import analyze_groups
    from splinecompress.model import load_model
    from splinecompress.report import format_stats_summary

    model = load_model(args.model)
    groups = analyze_groups(model)
    stats = calibrate(
        model, groups, args.calib, batch_size=args.batch_size, device=args.device, max_positions=args.max_positions
    )
    stats.save(args.output)
    print(format_stats_summary(stats, groups))
    print(f"wrote {args.output}: {len(stats.groups)} groups, {stats.samples} samples, provider {stats.provider}")
    return 0
