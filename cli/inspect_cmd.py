"""`splinecompress inspect model.onnx`: what is in a model, before anything is pruned."""

from __future__ import annotations

import argparse

from splinecompress.model import describe_model, load_model

NAME = "inspect"
HELP = "show a model's inputs, outputs, opset, ops, parameters, FLOPs, file size and prunable channel groups"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX file")


def run(args: argparse.Namespace) -> int:
    from splinecompress.graph.groups import group_summary
    from splinecompress.report import format_model_info

    model = load_model(args.model)
    print(format_model_info(describe_model(model, args.model), group_summary(model)))
    return 0
