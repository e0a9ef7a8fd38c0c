"""Entry point: parse, dispatch to one command module, map errors to exit codes.

Exit codes: 0 ok, 1 a check or validation gate failed, 2 bad input or usage. A SplineCompressError prints as one
line on stderr; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from splinecompress.errors import SplineCompressError, VerificationError

from . import (
    analyze_cmd,
    compress_cmd,
    export_cmd,
    finetune_cmd,
    inspect_cmd,
    plan_cmd,
    plot_cmd,
    prune_cmd,
    validate_cmd,
)

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2

# Each command module offers NAME, HELP, add_arguments(parser) and run(args) -> exit code.
COMMANDS = (
    compress_cmd,
    export_cmd,
    inspect_cmd,
    analyze_cmd,
    plan_cmd,
    prune_cmd,
    validate_cmd,
    plot_cmd,
    finetune_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    from splinecompress import __version__

    parser = argparse.ArgumentParser(
        prog="splinecompress", description="Prune ONNX models with spline codes of calibration data."
    )
    parser.add_argument("--version", action="version", version=f"splinecompress {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command_parser = sub.add_parser(command.NAME, help=command.HELP, description=command.HELP)
        command.add_arguments(command_parser)
        command_parser.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.run(args))
    except VerificationError as e:
        print(f"splinecompress {args.command}: check failed: {e}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except SplineCompressError as e:
        print(f"splinecompress {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"splinecompress {args.command}: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error of ours. Point stdout at devnull so the interpreter's
        # final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    sys.exit(code)
