"""Criteria on hand-built statistics with known answers, on real weights, and on the whole zoo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from splinecompress.calib.calibrate import calibrate
from splinecompress.calib.stats import GroupStats, SplineStats
from splinecompress.criteria import CRITERIA, CriterionInput, score, spline_removal_order
from splinecompress.errors import UsageError
from splinecompress.graph.groups import analyze_groups
from splinecompress.graph.surgery import apply_plan
from splinecompress.model import load_model
from splinecompress.policy import make_plan
from tests.zoo import ZOO, export_zoo_model


def stats_from_codes(codes: np.ndarray, activation: np.ndarray | None = None) -> GroupStats:
    """GroupStats of explicit code bits [positions, channels] (activation: mean post-activation per channel)."""
    bits = codes.astype(np.float32)  # float32 products of 0/1 are exact counts here, and BLAS-fast
    positions, channels = bits.shape
    on = bits.sum(axis=0).astype(np.int64)
    mass = on.astype(np.float64) if activation is None else np.asarray(activation) * positions
    return GroupStats(0, channels, positions, on, np.rint(bits.T @ bits).astype(np.int64), mass)


def random_codes(rng: np.random.Generator, positions: int, channels: int) -> np.ndarray:
    return rng.random((positions, channels)) < 0.5


def test_identical_pair_loses_one_member_first() -> None:
    rng = np.random.default_rng(0)
    codes = random_codes(rng, 400, 4)
    codes[:, 3] = codes[:, 1]  # channels 1 and 3 draw the same boundary
    order, distance = spline_removal_order(stats_from_codes(codes))
    assert order[0] in (1, 3), f"one of the identical pair must go first, order {order}"
    assert distance[order[0]] == 0.0
    assert sorted(order) == [0, 1, 2, 3]


def test_complementary_codes_are_the_same_boundary() -> None:
    rng = np.random.default_rng(1)
    codes = random_codes(rng, 400, 4)
    codes[:, 2] = ~codes[:, 0]  # the same hyperplane, other side on
    order, _ = spline_removal_order(stats_from_codes(codes))
    assert order[0] in (0, 2), f"complementary codes are one boundary: one of them goes first, order {order}"


def test_dead_channel_goes_first() -> None:
    rng = np.random.default_rng(2)
    codes = random_codes(rng, 400, 5)
    codes[:, 1] = codes[:, 4]  # a redundant pair exists, but the dead channel still goes before it
    codes[:, 3] = False
    order, distance = spline_removal_order(stats_from_codes(codes))
    assert order[0] == 3 and distance[3] < 0
    assert order[1] in (1, 4)


def test_pair_tie_break_keeps_the_larger_activation() -> None:
    rng = np.random.default_rng(3)
    codes = random_codes(rng, 400, 3)
    codes[:, 2] = codes[:, 0]
    order, _ = spline_removal_order(stats_from_codes(codes, activation=np.array([0.2, 0.5, 0.9])))
    assert order[0] == 0, "of the identical pair (0, 2), channel 0 has the smaller mean activation"
    order, _ = spline_removal_order(stats_from_codes(codes, activation=np.array([0.9, 0.5, 0.2])))
    assert order[0] == 2


def test_greedy_order_is_nearest_neighbour_removal() -> None:
    """Compare with a plain O(C^3) reference implementation of the greedy rule on random codes."""
    rng = np.random.default_rng(4)
    codes = random_codes(rng, 300, 12)
    activation = rng.random(12)
    stats = stats_from_codes(codes, activation)
    order, distance = spline_removal_order(stats)

    d = stats.hamming()
    b = np.minimum(d, 1 - d)
    kept = list(range(12))
    expected = []
    while len(kept) > 1:
        sub = b[np.ix_(kept, kept)] + np.diag(np.full(len(kept), np.inf))
        i, j = np.unravel_index(np.argmin(sub), sub.shape)
        k, partner = kept[i], kept[j]
        loser = k if activation[k] < activation[partner] else partner
        expected.append(loser)
        kept.remove(loser)
    expected.append(kept[0])
    assert list(order) == expected
    assert np.all(np.diff(distance[order][:-1]) >= 0), "distances at removal never decrease"


def test_spline_order_scales_to_2048_channels() -> None:
    rng = np.random.default_rng(5)
    codes = random_codes(rng, 2000, 2048)
    order, _ = spline_removal_order(stats_from_codes(codes))
    assert len(np.unique(order)) == 2048


# -- criteria on a real model ---------------------------------------------------------------------------------


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_l1_reads_the_source_filters(sample) -> None:
    model, groups, _ = sample
    scores = score("l1", CriterionInput(model, groups))
    conv = next(n for n in model.graph.node if n.name == groups[1].name)
    w = weights(model)[conv.input[1]]
    np.testing.assert_allclose(scores.per_group[1], np.abs(w).sum(axis=(1, 2, 3)), rtol=1e-6)
    # Group 0 joins the stem conv and the first block's second conv (identity shortcut): both filters count.
    sources = [n for n in model.graph.node if n.name in groups[0].sources]
    assert len(sources) == 2
    expected = sum(np.abs(weights(model)[n.input[1]]).sum(axis=(1, 2, 3)) for n in sources)
    np.testing.assert_allclose(scores.per_group[0], expected, rtol=1e-6)
    assert not scores.comparable


def test_apoz_is_the_on_fraction(sample) -> None:
    model, groups, stats = sample
    scores = score("apoz", CriterionInput(model, groups, stats))
    np.testing.assert_allclose(scores.per_group[2], stats[2].on_counts / stats[2].positions)


def test_bn_needs_batchnorm_nodes(sample, zoo_dir: Path) -> None:
    model, groups, _ = sample
    with pytest.raises(UsageError, match="export with --keep-batchnorm"):
        score("bn", CriterionInput(model, groups))
    kept_bn = load_model(export_zoo_model("resnet18", zoo_dir))  # exported with BatchNormalization nodes
    bn_groups = analyze_groups(kept_bn)
    scores = score("bn", CriterionInput(kept_bn, bn_groups))
    init = weights(kept_bn)
    group = next(g for g in bn_groups.prunable() if len(g.sources) == 1)
    bn = next(
        n
        for n in kept_bn.graph.node
        if n.op_type == "BatchNormalization"
        and n.input[0] in {o for s in kept_bn.graph.node if s.name == group.sources[0] for o in s.output}
    )
    np.testing.assert_allclose(scores.per_group[group.id], np.abs(init[bn.input[1]]))


def test_random_is_seeded(sample) -> None:
    model, groups, _ = sample
    a = score("random", CriterionInput(model, groups, seed=7)).per_group[3]
    b = score("random", CriterionInput(model, groups, seed=7)).per_group[3]
    c = score("random", CriterionInput(model, groups, seed=8)).per_group[3]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_data_criteria_need_matching_stats(sample, tmp_path: Path) -> None:
    model, groups, stats = sample
    with pytest.raises(UsageError, match="needs calibration statistics"):
        score("spline", CriterionInput(model, groups))
    other = SplineStats("0123456789abcdef", stats.groups)
    with pytest.raises(UsageError, match="not this model"):
        score("apoz", CriterionInput(model, groups, other))
    with pytest.raises(UsageError, match="unknown criterion 'magic'"):
        score("magic", CriterionInput(model, groups))


# -- every criterion makes plans that apply cleanly on the zoo ----------------------------------------------------


@pytest.mark.parametrize("name", list(ZOO))
def test_every_criterion_plans_apply_to_zoo(name: str, zoo_dir: Path) -> None:
    path = export_zoo_model(name, zoo_dir)
    model = load_model(path)
    groups = analyze_groups(model)
    shape = ZOO[name].input_shape
    x = np.random.default_rng(0).standard_normal((4, *shape[1:])).astype(np.float32)
    stats = calibrate(model, groups, [{"input": x}], max_positions=2000)
    has_bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    for criterion in CRITERIA:
        if criterion == "bn" and not has_bn:
            continue
        scores = score(criterion, CriterionInput(model, groups, stats))
        outcome = make_plan(model, groups, scores, ratio=0.3, scope="global", round_to=2)
        result = apply_plan(model, outcome.plan, groups)  # runs the full checker
        assert result.macs_after < result.macs_before, f"{name}/{criterion}: FLOPs must drop"
        assert result.params_after < result.params_before
