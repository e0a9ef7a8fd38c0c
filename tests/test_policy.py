"""Budget policies: ratios hit exactly (up to round_to), floors hold, FLOPs targets are met, bad budgets refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from splinecompress.criteria import CriterionInput, Scores, score
from splinecompress.errors import UsageError
from splinecompress.graph.groups import analyze_groups
from splinecompress.graph.plan import PruningPlan
from splinecompress.graph.surgery import apply_plan
from splinecompress.model import load_model
from splinecompress.policy import make_plan, removed_fraction
from tests.zoo import export_zoo_model


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.7])
def test_layer_scope_removes_the_same_fraction_everywhere(sample, ratio: float) -> None:
    model, groups, stats = sample
    scores = score("spline", CriterionInput(model, groups, stats))
    plan = make_plan(model, groups, scores, ratio=ratio, scope="layer").plan
    for gid, kept in plan.keep.items():
        channels = groups[gid].channels
        assert len(kept) == round(channels * (1 - ratio)), f"group {gid} keeps {len(kept)} of {channels}"
        # The lowest scores are the ones removed.
        removed = np.setdiff1d(np.arange(channels), kept)
        if len(removed):
            assert scores.per_group[gid][removed].max() <= scores.per_group[gid][list(kept)].min()


@pytest.mark.parametrize("criterion", ["spline", "l1", "apoz", "random"])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.7])
def test_global_scope_hits_the_ratio_exactly(sample, criterion: str, ratio: float) -> None:
    model, groups, stats = sample
    scores = score(criterion, CriterionInput(model, groups, stats))
    outcome = make_plan(model, groups, scores, ratio=ratio, scope="global", min_keep=0.1)
    total = sum(groups[g].channels for g in outcome.plan.keep)
    assert total - sum(len(k) for k in outcome.plan.keep.values()) == round(ratio * total)
    assert outcome.removed_fraction == pytest.approx(ratio, abs=0.5 / total)
    for gid, kept in outcome.plan.keep.items():
        assert len(kept) >= np.ceil(0.1 * groups[gid].channels), f"group {gid} is below its floor"


def test_global_floor_as_a_count(sample) -> None:
    model, groups, stats = sample
    scores = score("apoz", CriterionInput(model, groups, stats))
    plan = make_plan(model, groups, scores, ratio=0.9, scope="global", min_keep=8).plan
    assert min(len(k) for k in plan.keep.values()) >= 8


def test_global_normalises_weight_magnitudes(sample) -> None:
    """Raw L1 norms of a 1-input-channel stem are tiny next to a 64-channel conv's: without normalisation the
    global ranking would empty the stem's group first."""
    model, groups, _ = sample
    raw = score("l1", CriterionInput(model, groups))
    scaled = Scores("l1", {g: s * (1000.0 if g == 4 else 1.0) for g, s in raw.per_group.items()}, comparable=False)
    a = make_plan(model, groups, raw, ratio=0.5, scope="global").plan
    b = make_plan(model, groups, scaled, ratio=0.5, scope="global").plan
    assert a.keep == b.keep, "scaling one group's magnitudes must not change a normalised global ranking"


@pytest.mark.parametrize("round_to", [4, 8])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_round_to(sample, round_to: int, scope: str) -> None:
    model, groups, stats = sample
    scores = score("spline", CriterionInput(model, groups, stats))
    outcome = make_plan(model, groups, scores, ratio=0.45, scope=scope, round_to=round_to)
    for gid, kept in outcome.plan.keep.items():
        assert len(kept) % round_to == 0 or len(kept) == groups[gid].channels
    total = sum(groups[g].channels for g in outcome.plan.keep)
    # Rounding moves each group by at most round_to / 2 channels.
    assert abs(outcome.removed_fraction - 0.45) <= len(outcome.plan.keep) * round_to / 2 / total


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_flops_target_within_two_percent(sample, target: float) -> None:
    model, groups, stats = sample
    scores = score("spline", CriterionInput(model, groups, stats))
    outcome = make_plan(model, groups, scores, flops_target=target, scope="global")
    result = apply_plan(model, outcome.plan, groups)
    kept = result.macs_after / result.macs_before
    assert kept == pytest.approx(outcome.macs_kept)
    assert target - 0.02 <= kept <= target, f"FLOPs kept {kept:.3f} for a target of {target}"


@pytest.mark.parametrize(("scope", "round_to"), [("layer", 1), ("global", 8)])
def test_flops_target_on_resnet18(zoo_dir: Path, scope: str, round_to: int) -> None:
    model = load_model(export_zoo_model("resnet18", zoo_dir))
    groups = analyze_groups(model)
    scores = score("l1", CriterionInput(model, groups))
    outcome = make_plan(model, groups, scores, flops_target=0.5, scope=scope, round_to=round_to)
    # A FLOPs target is a budget: never above it, and within 2% of it.
    assert 0.48 <= outcome.macs_kept <= 0.5


def test_exclude_by_id_and_node_name(sample) -> None:
    model, groups, _ = sample
    scores = score("random", CriterionInput(model, groups))
    plan = make_plan(model, groups, scores, ratio=0.5, exclude=[2, groups[4].name]).plan
    assert 2 not in plan.keep and 4 not in plan.keep
    assert 1 in plan.keep
    with pytest.raises(UsageError, match="matches no group"):
        make_plan(model, groups, scores, ratio=0.5, exclude=["no_such_node"])


def test_drop_dead_removes_dead_channels_first(sample) -> None:
    model, groups, stats = sample
    # Make channels 0..4 of group 3 look dead, under a criterion that would otherwise keep them.
    stats.groups[3].on_counts = stats.groups[3].on_counts.copy()
    original = stats.groups[3].on_counts.copy()
    try:
        stats.groups[3].on_counts[:5] = 0
        scores = Scores("fake", {3: np.arange(64, dtype=float)[::-1]}, comparable=True)  # channel 0 scores highest
        kept = make_plan(model, groups, scores, ratio=0.25, drop_dead=True, stats=stats).plan.keep[3]
        assert not set(range(5)) & set(kept), "dead channels go first when drop_dead is on"
        kept = make_plan(model, groups, scores, ratio=0.25, drop_dead=False).plan.keep[3]
        assert set(range(5)) <= set(kept)
    finally:
        stats.groups[3].on_counts = original


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.0}, r"ratio 1\.0 is out of range"),
        ({"ratio": -0.1}, r"ratio -0\.1 is out of range"),
        ({"flops_target": 0.0}, r"FLOPs target 0\.0 is out of range"),
        ({"ratio": 0.5, "flops_target": 0.5}, "exactly one budget"),
        ({}, "exactly one budget"),
        ({"ratio": 0.5, "scope": "network"}, "scope 'network'"),
        ({"ratio": 0.5, "round_to": 0}, "round_to 0"),
        ({"ratio": 0.5, "drop_dead": True}, "drop_dead needs calibration statistics"),
        ({"flops_target": 0.001, "exclude": [0, 1, 2, 3, 4]}, "cannot be reached"),
    ],
)
def test_bad_budgets(sample, kwargs: dict, message: str) -> None:
    model, groups, _ = sample
    scores = score("random", CriterionInput(model, groups))
    with pytest.raises(UsageError, match=message):
        make_plan(model, groups, scores, **kwargs)


def test_plan_cli(sample_model: Path, sample_calib: Path, tmp_path: Path) -> None:
    stats_path = tmp_path / "stats.npz"
    cli = [sys.executable, "-m", "splinecompress.cli"]
    run = subprocess.run(
        [*cli, "analyze", str(sample_model), "--calib", str(sample_calib), "-o", str(stats_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    plan_path = tmp_path / "plan.json"
    run = subprocess.run(
        [
            *cli,
            "plan",
            str(sample_model),
            "--stats",
            str(stats_path),
            "--ratio",
            "0.5",
            "--scope",
            "global",
            "-o",
            str(plan_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "50.0% of the channels" in run.stdout
    data = json.loads(plan_path.read_text())
    assert data["criterion"] == "spline" and data["scope"] == "global"
    plan = PruningPlan.load(plan_path)
    model = load_model(sample_model)
    assert removed_fraction(plan, analyze_groups(model)) == pytest.approx(0.5, abs=0.01)

    missing_stats = subprocess.run(
        [*cli, "plan", str(sample_model), "--ratio", "0.5", "-o", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing_stats.returncode == 2 and "needs calibration statistics" in missing_stats.stderr
    assert "Traceback" not in missing_stats.stderr and not (tmp_path / "x.json").exists()
    bad_ratio = subprocess.run(
        [*cli, "plan", str(sample_model), "--criterion", "l1", "--ratio", "2", "-o", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad_ratio.returncode == 2 and "ratio 2.0 is out of range" in bad_ratio.stderr


def test_global_spline_does_not_strip_the_early_layers(sample) -> None:
    """Raw boundary distances are smaller in early layers; unnormalised, a global ranking kept only 11/32 and 9/32
    channels of the two full-resolution groups at ratio 0.3 (and lost 5.6 points more than layerwise)."""
    model, groups, stats = sample
    plan = make_plan(
        model, groups, score("spline", CriterionInput(model, groups, stats)), ratio=0.3, scope="global"
    ).plan
    kept = {gid: len(k) / groups[gid].channels for gid, k in plan.keep.items()}
    print(f"kept fraction per group, spline global 0.3: {kept}")
    assert min(kept[0], kept[1]) >= 0.5, kept
