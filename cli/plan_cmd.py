"""`splinecompress plan model.onnx --stats stats.npz --ratio 0.5 -o plan.json`: choose the channels to keep."""

from __future__ import annotations

import argparse

from splinecompress.criteria import CRITERIA
from splinecompress.policy import DEFAULT_MIN_KEEP, SCOPES

NAME = "plan"
HELP = "score channels with a criterion and write a pruning plan (JSON) for a ratio or FLOPs budget"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX file")
    parser.add_argument("--stats", help="statistics from `splinecompress analyze` (needed by spline and apoz)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=float, help="fraction of prunable channels to remove, in [0, 1)")
    budget.add_argument("--flops-target", type=float, help="fraction of FLOPs to keep, in (0, 1]")
    parser.add_argument("--criterion", choices=sorted(CRITERIA), default="spline", help="default: spline")
    parser.add_argument("--scope", choices=SCOPES, default="layer", help="default: layer")
    parser.add_argument(
        "--round-to",
        type=int,
        default=8,
        help="keep channel counts multiples of N (default 8: CPU kernels are much faster so)",
    )
    parser.add_argument(
        "--min-keep",
        type=float,
        default=DEFAULT_MIN_KEEP,
        help=f"global scope floor per group: a count or a fraction (default {DEFAULT_MIN_KEEP})",
    )
    parser.add_argument(
        "--exclude", nargs="*", default=[], metavar="GROUP_OR_NODE", help="group ids or node names to leave whole"
    )
    parser.add_argument(
        "--drop-dead",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="remove never-active channels first (default: on for spline, off otherwise)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    parser.add_argument("-o", "--output", required=True, help="plan file to write (.json)")


def run(args: argparse.Namespace) -> int:
    from splinecompress.calib.stats import SplineStats
    from splinecompress.criteria import CriterionInput, score
    from splinecompress.graph.groups import analyze_groups
    from splinecompress.model import load_model
    from splinecompress.policy import make_plan

    model = load_model(args.model)
    groups = analyze_groups(model)
    stats = SplineStats.load(args.stats) if args.stats else None
    scores = score(args.criterion, CriterionInput(model, groups, stats, seed=args.seed))
    drop_dead = args.drop_dead if args.drop_dead is not None else (args.criterion == "spline")
    outcome = make_plan(
        model,
        groups,
        scores,
        ratio=args.ratio,
        flops_target=args.flops_target,
        scope=args.scope,
        min_keep=args.min_keep,
        round_to=args.round_to,
        exclude=args.exclude,
        drop_dead=drop_dead and stats is not None,
        stats=stats,
    )
    outcome.plan.save(args.output)
    pruned = sum(1 for gid, k in outcome.plan.keep.items() if len(k) < groups[gid].channels)
    line = (
        f"wrote {args.output}: criterion {args.criterion}, scope {args.scope}, "
        f"{outcome.removed_fraction:.1%} of the channels of {len(outcome.plan.keep)} groups removed "
        f"({pruned} groups pruned)"
    )
    if outcome.macs_kept is not None:
        line += f", {outcome.macs_kept:.1%} of FLOPs kept"
    print(line)
    return 0
