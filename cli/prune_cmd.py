"""`splinecompress prune model.onnx --plan plan.json -o slim.onnx`: remove the plan's channels for real."""

from __future__ import annotations

import argparse

NAME = "prune"
HELP = "remove the channels a plan drops and check the result equals the masked original"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX file the plan was made for")
    parser.add_argument("--plan", required=True, help="plan JSON (from `splinecompress plan`, or hand-edited)")
    parser.add_argument("-o", "--output", required=True, help="slim ONNX file to write")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the equivalence check against the masked original (onnxruntime, random inputs)",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="largest allowed max|slim - masked| / max|masked| per output (default 1e-4)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random verification inputs")


def run(args: argparse.Namespace) -> int:
    import sys

    from splinecompress.errors import UsageError
    from splinecompress.graph.equivalence import DEFAULT_RTOL, check_equivalence
    from splinecompress.graph.groups import analyze_groups
    from splinecompress.graph.plan import PruningPlan
    from splinecompress.graph.surgery import apply_plan
    from splinecompress.model import load_model, save_model

    rtol = DEFAULT_RTOL if args.rtol is None else args.rtol
    if not rtol > 0:
        raise UsageError(f"--rtol must be positive, got {args.rtol}")
    model = load_model(args.model)
    plan = PruningPlan.load(args.plan)
    groups = analyze_groups(model)
    result = apply_plan(model, plan, groups)
    removed = sum(result.channels_removed.values())
    print(f"pruned {len(result.channels_removed)} groups, {removed} channels removed")
    print(
        f"parameters {result.params_before:,} -> {result.params_after:,} "
        f"({_ratio(result.params_after, result.params_before)})"
    )
    print(
        f"MACs       {result.macs_before:,} -> {result.macs_after:,} ({_ratio(result.macs_after, result.macs_before)})"
    )
    if not args.no_verify:
        check = check_equivalence(model, result.model, plan, groups, seed=args.seed, rtol=rtol)
        print(check.describe())
        if not check.passed:
            print(
                f"splinecompress prune: the pruned model does not match the masked original; {args.output} was "
                "not written",
                file=sys.stderr,
            )
            return 1
    save_model(result.model, args.output)
    print(f"wrote {args.output}")
    return 0


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.1%} of the original" if before else "n/a"
