"""Budget policies: turn criterion scores into a PruningPlan.

- ``scope="layer"``: every eligible group loses the same fraction of its channels (its lowest scores).
- ``scope="global"``: one ranking over all eligible channels; scores of criteria that are not on a common scale
  (weight magnitudes) are divided by their group's mean first. A floor keeps at least ``min_keep`` channels (a
  count >= 1, or a fraction < 1 of the group) in every group, so no layer is wiped out.
- The budget is a ``ratio`` (fraction of eligible channels removed) or a ``flops_target`` (fraction of the model's
  MACs to keep), which is met by bisection on the ratio, measuring each candidate plan's MACs after surgery.
- ``round_to`` keeps channel counts multiples of N (hardware kernels prefer them); ``exclude`` leaves groups
  alone by id or by the name of a node in them; ``drop_dead`` removes never-active channels first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from splinecompress.calib.stats import SplineStats
from splinecompress.criteria import Scores
from splinecompress.errors import UsageError
from splinecompress.graph.groups import Group, Groups
from splinecompress.graph.plan import PruningPlan, round_channels
from splinecompress.graph.surgery import apply_plan

__all__ = ["SCOPES", "PlanOutcome", "make_plan", "removed_fraction"]

log = logging.getLogger(__name__)

SCOPES = ("layer", "global")
DEFAULT_MIN_KEEP = 0.1
_FLOPS_TOLERANCE = 0.005
_BISECTION_STEPS = 24


@dataclass(frozen=True)
class PlanOutcome:
    """A plan and what it achieves: fraction of eligible channels removed and (for FLOPs budgets) MACs kept."""

    plan: PruningPlan
    removed_fraction: float
    macs_kept: float | None = None


def make_plan(
    model: onnx.ModelProto,
    groups: Groups,
    scores: Scores,
    *,
    ratio: float | None = None,
    flops_target: float | None = None,
    scope: str = "layer",
    min_keep: float = DEFAULT_MIN_KEEP,
    round_to: int = 1,
    exclude: Sequence[int | str] = (),
    drop_dead: bool = False,
    stats: SplineStats | None = None,
) -> PlanOutcome:
    """Choose the channels to keep.

    Args:
        model: the model (for FLOPs budgets and the plan's hash).
        groups: its groups.
        scores: a criterion's scores (low = remove first).
        ratio: fraction of the eligible channels to remove, in [0, 1).
        flops_target: fraction of the model's MACs to keep, in (0, 1]; exclusive with ``ratio``.
        scope: "layer" or "global".
        min_keep: floor per group for global scope: a count (>= 1) or a fraction (< 1) of the group.
        round_to: keep a multiple of this many channels per pruned group.
        exclude: group ids or node names whose groups are left whole.
        drop_dead: remove channels never active on the calibration data first (needs ``stats``).
        stats: calibration statistics (for ``drop_dead``).

    Raises:
        UsageError: a budget or option out of range, an exclude entry matching no group, or drop_dead without stats.
    """
    if (ratio is None) == (flops_target is None):
        raise UsageError("give exactly one budget: a ratio or a FLOPs target")
    if scope not in SCOPES:
        raise UsageError(f"scope '{scope}' is not one of {', '.join(SCOPES)}")
    if round_to < 1:
        raise UsageError(f"round_to {round_to} must be at least 1")
    if min_keep <= 0:
        raise UsageError(f"min_keep {min_keep} must be positive (a count, or a fraction below 1)")
    if drop_dead and stats is None:
        raise UsageError("drop_dead needs calibration statistics")
    eligible = _eligible_groups(groups, scores, exclude)
    ranked = _ranking_scores(scores, eligible, scope, stats if drop_dead else None)

    def plan_for(r: float) -> PruningPlan:
        keep_counts = (
            _layer_counts(eligible, r, round_to)
            if scope == "layer"
            else _global_counts(eligible, ranked, r, min_keep, round_to)
        )
        keep = {g.id: _top_channels(ranked[g.id], keep_counts[g.id]) for g in eligible}
        return PruningPlan(
            model_hash=groups.model_hash,
            keep=keep,
            criterion=scores.criterion,
            ratio=round(r, 6),
            scope=scope,
            round_to=round_to,
            names={g.id: g.name for g in eligible},
            channels={g.id: g.channels for g in eligible},
        )

    if ratio is not None:
        if not 0 <= ratio < 1:
            raise UsageError(f"ratio {ratio} is out of range: it is the fraction of channels removed, in [0, 1)")
        plan = plan_for(ratio)
        return PlanOutcome(plan, removed_fraction(plan, groups))
    return _solve_flops(model, groups, plan_for, flops_target)


def removed_fraction(plan: PruningPlan, groups: Groups) -> float:
    """Fraction of the channels of the plan's groups that the plan removes."""
    total = sum(groups[gid].channels for gid in plan.keep)
    kept = sum(len(k) for k in plan.keep.values())
    return (total - kept) / total if total else 0.0


def _eligible_groups(groups: Groups, scores: Scores, exclude: Sequence[int | str]) -> list[Group]:
    excluded: set[int] = set()
    for entry in exclude:
        matches = [g.id for g in groups if _matches(g, entry)]
        if not matches:
            raise UsageError(f"exclude entry '{entry}' matches no group id or node name of this model")
        excluded.update(matches)
    eligible = [g for g in groups.prunable() if g.id in scores.per_group and g.id not in excluded]
    if not eligible:
        raise UsageError(f"no group can be pruned with criterion {scores.criterion} (all frozen, unscored or excluded)")
    for gid, why in scores.skipped.items():
        log.info("group %d keeps all channels: %s", gid, why)
    return eligible


def _matches(group: Group, entry: int | str) -> bool:
    if isinstance(entry, int) or (isinstance(entry, str) and entry.isdigit()):
        return group.id == int(entry)
    return entry == group.name or entry in group.sources or any(m.node == entry for m in group.members)


def _ranking_scores(
    scores: Scores, eligible: list[Group], scope: str, stats: SplineStats | None
) -> dict[int, np.ndarray]:
    ranked = {}
    for group in eligible:
        values = np.asarray(scores.per_group[group.id], dtype=np.float64).copy()
        if values.shape != (group.channels,):
            raise UsageError(f"{group.label}: criterion gave {values.shape} scores for {group.channels} channels")
        if scope == "global" and not scores.comparable:
            # Weight magnitudes differ by layer; relative to the group's mean they share one scale.
            values = values / max(float(np.mean(np.abs(values))), 1e-12)
        if stats is not None and group.id in stats.groups:
            values[stats.groups[group.id].dead()] = -np.inf
        ranked[group.id] = values
    return ranked


def _layer_counts(eligible: list[Group], ratio: float, round_to: int) -> dict[int, int]:
    return {g.id: round_channels(g.channels * (1 - ratio), g.channels, round_to) for g in eligible}


def _floor(group: Group, min_keep: float) -> int:
    count = math.ceil(min_keep * group.channels) if min_keep < 1 else int(min_keep)
    return min(group.channels, max(1, count))


def _global_counts(
    eligible: list[Group], ranked: dict[int, np.ndarray], ratio: float, min_keep: float, round_to: int
) -> dict[int, int]:
    total = sum(g.channels for g in eligible)
    to_remove = round(ratio * total)
    removable = {g.id: g.channels - _floor(g, min_keep) for g in eligible}
    all_scores = np.concatenate([ranked[g.id] for g in eligible])
    owner = np.concatenate([np.full(g.channels, g.id) for g in eligible])
    removed = dict.fromkeys(removable, 0)
    left = to_remove
    for index in np.argsort(all_scores, kind="stable"):
        if left == 0:
            break
        gid = int(owner[index])
        if removed[gid] < removable[gid]:
            removed[gid] += 1
            left -= 1
    return {g.id: round_channels(g.channels - removed[g.id], g.channels, round_to) for g in eligible}


def _top_channels(values: np.ndarray, count: int) -> tuple[int, ...]:
    """The ``count`` highest-scoring channels (ties: lower index kept), sorted."""
    order = np.argsort(-values, kind="stable")
    return tuple(int(i) for i in np.sort(order[:count]))


def _solve_flops(model, groups: Groups, plan_for, flops_target: float) -> PlanOutcome:
    if not 0 < flops_target <= 1:
        raise UsageError(f"FLOPs target {flops_target} is out of range: it is the fraction of FLOPs kept, in (0, 1]")

    def macs_kept(plan: PruningPlan) -> float:
        result = apply_plan(model, plan, groups, check=False)
        return result.macs_after / result.macs_before if result.macs_before else 1.0

    low, high = 0.0, 0.99
    best = plan_for(low)
    best_kept = 1.0
    if best_kept <= flops_target:
        return PlanOutcome(best, 0.0, best_kept)
    high_plan = plan_for(high)
    high_kept = macs_kept(high_plan)
    if high_kept > flops_target:
        raise UsageError(
            f"FLOPs target {flops_target:.3f} cannot be reached: removing 99% of the prunable channels keeps "
            f"{high_kept:.3f} of the FLOPs (the rest is in frozen groups)"
        )
    best, best_kept = high_plan, high_kept
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        plan = plan_for(middle)
        kept = macs_kept(plan)
        if kept <= flops_target:
            high, best, best_kept = middle, plan, kept
        else:
            low = middle
        if 0 <= flops_target - best_kept <= _FLOPS_TOLERANCE or high - low < 1e-4:
            break
    return PlanOutcome(best, removed_fraction(best, groups), best_kept)
