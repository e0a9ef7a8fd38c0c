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
    parser.add_argument(
        "--repair",
        choices=("none", "bias", "lstsq"),
        default="none",
        help="training-free repair before removal (bias and lstsq need --stats; lstsq also --calib)",
    )
    parser.add_argument("--stats", help="statistics from `splinecompress analyze` (for --repair)")
    parser.add_argument("--calib", help="calibration data, for the patch statistics of --repair lstsq")


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
    if args.repair != "none":
        model, plan = _repaired(model, groups, plan, args)
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


def _repaired(model, groups, plan, args: argparse.Namespace):
    """The model with its sinks repaired for the plan, and the plan re-tied to it (equivalence then holds)."""
    from splinecompress.calib.moments import collect_moments
    from splinecompress.calib.stats import SplineStats
    from splinecompress.errors import UsageError
    from splinecompress.repair import lstsq_sinks, repair_model

    if not args.stats:
        raise UsageError(f"--repair {args.repair} needs --stats (from `splinecompress analyze`)")
    plan.validate(groups)
    moments = None
    if args.repair == "lstsq":
        if not args.calib:
            raise UsageError("--repair lstsq needs --calib (the calibration data, for patch statistics)")
        moments = collect_moments(model, lstsq_sinks(model, groups, plan)[0], args.calib)
    result = repair_model(model, groups, plan, method=args.repair, stats=SplineStats.load(args.stats), moments=moments)
    print(f"repair {args.repair}: {len(result.repaired)} sinks repaired")
    return result.model, result.plan


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.1%} of the original" if before else "n/a"
