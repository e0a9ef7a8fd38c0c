"""`splinecompress export MODULE:FACTORY -o model.onnx --input-shape 1x3x32x32`."""

from __future__ import annotations

import argparse

from splinecompress.errors import UsageError

NAME = "export"
HELP = "export a PyTorch model (MODULE:FACTORY) to ONNX and check ONNX against torch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="MODULE:FACTORY", help="importable factory returning a torch.nn.Module")
    parser.add_argument("-o", "--output", required=True, help="ONNX file to write")
    parser.add_argument("--input-shape", required=True, help="input shape, batch first, e.g. 1x3x224x224")
    parser.add_argument("--weights", help="state dict (.pt) to load into the module before export")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; dynamo always writes 18)")
    parser.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension symbolic")
    parser.add_argument(
        "--keep-batchnorm",
        action="store_true",
        help="keep BatchNormalization nodes instead of folding them into Conv (the bn criterion needs them)",
    )
    parser.add_argument("--dynamo", action="store_true", help="use torch's dynamo-based exporter")
    parser.add_argument("--input-name", default="input", help="name of the graph input (default: input)")
    parser.add_argument("--output-name", default="output", help="name of the graph output (default: output)")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise UsageError(f"--input-shape '{text}' is not a shape like 1x3x224x224") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape '{text}' must have positive dimensions")
    return shape


def run(args: argparse.Namespace) -> int:
    from splinecompress.export import DEFAULT_OPSET, build_module, export_model

    shape = parse_shape(args.input_shape)
    module = build_module(args.spec, args.weights)
    result = export_model(
        module,
        args.output,
        shape,
        input_names=(args.input_name,),
        output_names=(args.output_name,),
        dynamic_batch=args.dynamic_batch,
        opset=args.opset or DEFAULT_OPSET,
        keep_batchnorm=args.keep_batchnorm,
        dynamo=args.dynamo,
    )
    print(
        f"wrote {result.path}: {result.exporter} exporter, opset {result.opset}, "
        f"{result.batchnorm_nodes} BatchNormalization nodes kept"
    )
    print(f"parity with torch: max |diff| {result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g})")
    return 0
