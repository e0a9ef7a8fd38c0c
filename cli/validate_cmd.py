"""`splinecompress validate slim.onnx --data val.npz [--reference model.onnx] [--json report.json]`."""

from __future__ import annotations

import argparse

from splinecompress.calib.runner import DEVICES

NAME = "validate"
HELP = "measure accuracy, agreement with a reference, output differences, latency and size of a model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX file to validate (the slim model)")
    parser.add_argument(
        "--data", required=True, help="validation data: .npz file or folder of .npy/.npz files (optional 'labels')"
    )
    parser.add_argument("--reference", default=None, help="ONNX file to compare with (the original model)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON to PATH")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="execution provider (default: auto)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both sessions (default 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per run in the accuracy pass (default 32)")
    parser.add_argument("--latency-batch", type=int, default=1, help="rows per timed run (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default 50)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per model before timing (default 10)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency benchmark")


def run(args: argparse.Namespace) -> int:
    from splinecompress.report import format_comparison, write_report_json
    from splinecompress.validate import DEFAULT_REPEATS, DEFAULT_WARMUP, validate

    report = validate(
        args.model,
        args.data,
        reference=args.reference,
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
        latency_batch=args.latency_batch,
        warmup=DEFAULT_WARMUP if args.warmup is None else args.warmup,
        repeats=DEFAULT_REPEATS if args.repeats is None else args.repeats,
        measure_latency=not args.no_latency,
    )
    print(format_comparison(report))
    if args.json:
        print(f"wrote {write_report_json(report, args.json)}")
    return 0
