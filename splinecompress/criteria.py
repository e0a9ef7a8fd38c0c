"""Pruning criteria: per group, one score per channel, low = remove first. One plain function each, in a registry.

- ``spline`` (PAPER.md): channels whose spline codes on the calibration data draw (nearly) the same boundary as a
  kept channel are redundant. Boundary distance B = min(D, 1 - D) of the normalised Hamming distance D (a
  boundary is the same whichever side is "on"). Always-off channels go first, then greedily the channel nearest
  to a kept one; of the nearest pair the one with the smaller mean activation goes. A channel's score is its
  boundary distance to the nearest kept channel when it is removed (non-decreasing along the removal order),
  divided by the group's mean nearest-neighbour distance: raw distances were measured not to be comparable
  across layers, and one global ranking over them emptied the early layers.
- ``l1``: L1 norm of each channel's source filter (Li et al. 2017), summed over the sources of a joined group. It
  reads the weights as exported: BatchNorm folded into the conv unless exported with ``--keep-batchnorm``, in
  which case it reads the raw conv weights (PAPER.md measured raw-conv L1 as the stronger baseline).
- ``bn``: |gamma| of BatchNormalization (network slimming), summed over the BN nodes of a group; needs a model
  exported with BatchNormalization nodes.
- ``apoz``: fraction of calibration positions where the channel is on (1 - APoZ, Hu et al. 2016).
- ``random``: seeded uniform scores, the baseline every criterion must beat.

A group a criterion cannot score (no statistics, no BN node) is absent from its result: the policy keeps it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from splinecompress.calib.stats import GroupStats, SplineStats
from splinecompress.errors import UsageError
from splinecompress.graph.groups import Group, Groups, Member

__all__ = [
    "CRITERIA",
    "CriterionInput",
    "Scores",
    "apoz_scores",
    "bn_scores",
    "l1_scores",
    "random_scores",
    "score",
    "spline_removal_order",
    "spline_scores",
]

# Score of a group's last channel under the spline criterion: above any boundary distance (at most 0.5).
_LAST_CHANNEL_SCORE = 1.0
_DEAD_SCORE = -1.0


@dataclass(frozen=True)
class CriterionInput:
    """What criteria may read. ``stats`` is required by data criteria only."""

    model: onnx.ModelProto
    groups: Groups
    stats: SplineStats | None = None
    seed: int = 0


@dataclass(frozen=True)
class Scores:
    """Per group id, one score per channel (low = remove first), and the criterion that made them.

    ``comparable`` says whether scores of different groups share a scale (distances, fractions) or must be
    normalised before one global ranking (weight magnitudes).
    """

    criterion: str
    per_group: dict[int, np.ndarray]
    comparable: bool
    skipped: dict[int, str] = field(default_factory=dict)  # group id -> why it has no scores


# -- spline ----------------------------------------------------------------------------------------------------


def boundary_distance(stats: GroupStats) -> np.ndarray:
    """B[k, k'] = min(D, 1 - D): complementary codes draw the same boundary."""
    distance = stats.hamming()
    return np.minimum(distance, 1.0 - distance)


def spline_removal_order(stats: GroupStats) -> tuple[np.ndarray, np.ndarray]:
    """The spline criterion's removal order for one group and each channel's distance when removed.

    Dead channels first (distance -1), then greedily: the channel nearest to another kept channel, of that pair
    the one with the smaller mean activation. Nearest neighbours are updated only for the channels whose
    neighbour was removed, so the whole order costs O(C^2) numpy work (C = 2048 takes well under a second).

    Returns:
        (channel indices in removal order, including all C channels; distance at removal per channel).
    """
    c = stats.channels
    at_removal = np.full(c, _LAST_CHANNEL_SCORE)
    dead = np.flatnonzero(stats.dead())
    at_removal[dead] = _DEAD_SCORE
    order = list(dead)
    alive = np.setdiff1d(np.arange(c), dead)
    if len(alive) <= 1:
        return np.array(order + list(alive), dtype=np.int64), at_removal

    distance = boundary_distance(stats)[np.ix_(alive, alive)].astype(np.float64)
    np.fill_diagonal(distance, np.inf)
    activation = stats.mean_activation()[alive]
    kept = np.ones(len(alive), dtype=bool)
    nearest = distance.argmin(axis=1)
    nearest_distance = distance[np.arange(len(alive)), nearest]
    for _ in range(len(alive) - 1):
        candidates = np.where(kept, nearest_distance, np.inf)
        k = int(candidates.argmin())
        partner = int(nearest[k])
        removed = (
            k
            if activation[k] < activation[partner] or (activation[k] == activation[partner] and k > partner)
            else partner
        )
        at_removal[alive[removed]] = nearest_distance[k]
        order.append(alive[removed])
        kept[removed] = False
        distance[:, removed] = np.inf
        # Only channels whose nearest kept neighbour just went need a new one.
        stale = np.flatnonzero(kept & (nearest == removed))
        if len(stale):
            nearest[stale] = distance[stale].argmin(axis=1)
            nearest_distance[stale] = distance[stale, nearest[stale]]
    order.append(alive[int(np.flatnonzero(kept)[0])])
    return np.array(order, dtype=np.int64), at_removal


def _mean_nearest_distance(stats: GroupStats) -> float:
    """Mean over channels of the boundary distance to the nearest other channel (the group's distance scale)."""
    if stats.channels < 2:
        return 1.0
    distance = boundary_distance(stats)
    np.fill_diagonal(distance, np.inf)
    return max(float(distance.min(axis=1).mean()), 1e-6)


def spline_scores(inputs: CriterionInput) -> Scores:
    stats = _require_stats(inputs, "spline")

    def group_scores(group: Group) -> np.ndarray | None:
        group_stats = _calibrated(stats, group)
        if group_stats is None:
            return None
        order, at_removal = spline_removal_order(group_stats)
        # Raw distances are not comparable across groups: early, high-resolution layers have nearer neighbours
        # (measured on the sample: median 0.17 vs 0.26 in the last stage), so one global ranking stripped them.
        # Relative to the group's mean nearest-neighbour distance they are (README, "Results").
        at_removal = at_removal / _mean_nearest_distance(group_stats)
        # Distances repeat (ties, dead channels); a tiny ramp along the order keeps the greedy order intact.
        ramp = np.empty(group.channels)
        ramp[order] = np.arange(group.channels) * 1e-9
        return at_removal + ramp

    return _score_groups(inputs, "spline", group_scores, _NO_STATS, comparable=True)


# -- baselines -------------------------------------------------------------------------------------------------


def l1_scores(inputs: CriterionInput) -> Scores:
    # A source's weight is its input 1 (Conv/ConvTranspose/Gemm W, MatMul B); input 2 is its bias.
    def is_source_weight(member: Member) -> bool:
        return member.role == "source" and member.input == 1

    return _score_groups(
        inputs, "l1", _magnitude(inputs, is_source_weight), "no constant source weight", comparable=False
    )


def bn_scores(inputs: CriterionInput) -> Scores:
    batchnorms = {node.name for node in inputs.model.graph.node if node.op_type == "BatchNormalization"}
    if not batchnorms:
        raise UsageError(
            "criterion bn needs BatchNormalization nodes, and this model has none (BN was folded into the convs): "
            "export with --keep-batchnorm, or choose another criterion"
        )

    def is_bn_scale(member: Member) -> bool:
        return member.node in batchnorms and member.input == 1  # BatchNormalization input 1: scale (gamma)

    return _score_groups(
        inputs, "bn", _magnitude(inputs, is_bn_scale), "no BatchNormalization node in the group", comparable=False
    )


def apoz_scores(inputs: CriterionInput) -> Scores:
    stats = _require_stats(inputs, "apoz")

    def group_scores(group: Group) -> np.ndarray | None:
        group_stats = _calibrated(stats, group)
        return None if group_stats is None else group_stats.on_fraction().astype(np.float64)

    return _score_groups(inputs, "apoz", group_scores, _NO_STATS, comparable=True)


_NO_STATS = "no spline statistics (no probe tensor)"


def _calibrated(stats: SplineStats, group: Group) -> GroupStats | None:
    """The group's statistics, or None when calibration saw no position of it."""
    group_stats = stats.groups.get(group.id)
    return None if group_stats is None or group_stats.positions == 0 else group_stats


def _score_groups(
    inputs: CriterionInput,
    criterion: str,
    group_scores: Callable[[Group], np.ndarray | None],
    why_missing: str,
    *,
    comparable: bool,
) -> Scores:
    """Scores of every prunable group that ``group_scores`` can score (None: skipped, with ``why_missing``)."""
    per_group, skipped = {}, {}
    for group in inputs.groups.prunable():
        values = group_scores(group)
        if values is None:
            skipped[group.id] = why_missing
        else:
            per_group[group.id] = values
    return Scores(criterion, per_group, comparable=comparable, skipped=skipped)


def _magnitude(inputs: CriterionInput, select: Callable[[Member], bool]) -> Callable[[Group], np.ndarray | None]:
    """Per channel, the sum of |w| over the selected constant members' slices (None if the group has none)."""
    constants = _constants(inputs.model)

    def group_scores(group: Group) -> np.ndarray | None:
        members = [m for m in group.members if select(m) and m.tensor in constants]
        if not members:
            return None
        total = np.zeros(group.channels)
        for member in members:
            weight = np.abs(constants[member.tensor].astype(np.float64))
            per_index = np.moveaxis(weight, member.axis, 0).reshape(weight.shape[member.axis], -1).sum(axis=1)
            total += per_index[member.indices(np.arange(group.channels))].reshape(group.channels, -1).sum(axis=1)
        return total

    return group_scores


def random_scores(inputs: CriterionInput) -> Scores:
    rng = np.random.default_rng(inputs.seed)
    per_group = {group.id: rng.random(group.channels) for group in inputs.groups.prunable()}
    return Scores("random", per_group, comparable=True)


CRITERIA: dict[str, Callable[[CriterionInput], Scores]] = {
    "spline": spline_scores,
    "l1": l1_scores,
    "bn": bn_scores,
    "apoz": apoz_scores,
    "random": random_scores,
}
# Criteria that read calibration statistics.
DATA_CRITERIA = frozenset({"spline", "apoz"})


def score(criterion: str, inputs: CriterionInput) -> Scores:
    """Run a criterion by name.

    Raises:
        UsageError: unknown criterion, or a data criterion without statistics, or bn without BN nodes.
    """
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion '{criterion}': choose one of {', '.join(CRITERIA)}")
    return CRITERIA[criterion](inputs)


def _require_stats(inputs: CriterionInput, name: str) -> SplineStats:
    if inputs.stats is None:
        raise UsageError(
            f"criterion {name} needs calibration statistics: run `splinecompress analyze` and pass --stats"
        )
    if inputs.stats.model_hash != inputs.groups.model_hash:
        raise UsageError(
            f"statistics were computed on model {inputs.stats.model_hash}, not this model ({inputs.groups.model_hash})"
        )
    return inputs.stats


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers, Constant-node values and Identity copies of them, by tensor name."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:  # topological order: an Identity's input is known before the Identity
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            # The legacy exporter shares equal weights (e.g. fresh BN scales) behind Identity nodes.
            values[node.output[0]] = values[node.input[0]]
    return values
