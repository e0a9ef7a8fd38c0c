"""`splinecompress plot model.onnx --calib calib.npz --val val.npz -o sweep.png`: accuracy vs FLOPs kept."""

from __future__ import annotations

import argparse

from splinecompress.calib.runner import DEVICES
from splinecompress.criteria import CRITERIA
from splinecompress.errors import UsageError
from splinecompress.policy import SCOPES
from splinecompress.repair import REPAIRS

NAME = "plot"
HELP = "prune at a sweep of ratios and draw accuracy against FLOPs kept (PNG), to pick a ratio by looking"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX file")
    parser.add_argument("--calib", required=True, help="calibration data (.npz or folder)")
    parser.add_argument("--val", required=True, help="validation data (.npz; labels give accuracy)")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7", help="comma-separated ratios")
    parser.add_argument("--criterion", choices=sorted(CRITERIA), default="spline", help="default: spline")
    parser.add_argument("--scope", choices=SCOPES, default="layer", help="default: layer")
    parser.add_argument("--repair", choices=REPAIRS, default="lstsq", help="default: lstsq")
    parser.add_argument("--round-to", type=int, default=8, help="keep channel counts multiples of N (default 8)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="execution provider for calibration")
    parser.add_argument("-o", "--output", required=True, help="PNG file to write")


def run(args: argparse.Namespace) -> int:
    from splinecompress.report import format_sweep, plot_points
    from splinecompress.sweep import prepare, sweep

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--ratios '{args.ratios}' must be comma-separated numbers, e.g. 0.1,0.3,0.5") from None
    if not ratios:
        raise UsageError("--ratios is empty")
    prepared = prepare(args.model, args.calib, device=args.device)
    points = sweep(
        prepared,
        args.val,
        ratios,
        criterion=args.criterion,
        scope=args.scope,
        repair=args.repair,
        round_to=args.round_to,
    )
    print(format_sweep(points))
    label = f"{args.criterion}, {args.scope}, {args.repair} repair"
    metric = [(p.flops_kept, p.accuracy if p.accuracy is not None else p.agreement) for p in points]
    if not plot_points({(args.model, label): metric}, args.output):
        raise UsageError("plot needs matplotlib: pip install 'splinecompress[plot]'")
    print(f"wrote {args.output}")
    return 0
