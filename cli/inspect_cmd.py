"""`splinecompress inspect model.onnx`: what is in a model, before anything is pruned."""

from __future__ import annotations

import argparse

from splinecompress.model import describe_model, load_model

NAME = "inspect"
HELP = "show a model's inputs, outputs, opset, ops, parameters and file size"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX file")


def run(args: argparse.Namespace) -> int:
    from splinecompress.report import format_model_info

    model = load_model(args.model)
    print(format_model_info(describe_model(model, args.model)))
    return 0
