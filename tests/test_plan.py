"""PruningPlan: JSON round trip, validation against its model with clear messages, round_to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splinecompress.errors import PlanError, UsageError
from splinecompress.graph.groups import Groups, analyze_groups
from splinecompress.graph.plan import PruningPlan, random_plan, round_channels
from splinecompress.graph.surgery import apply_plan
from tests.zoo import Net


@pytest.fixture(scope="module")
def groups() -> Groups:
    net = Net()
    h = net.op("Relu", [net.conv("x", 3, 64, name="conv1")])
    h = net.op("Relu", [net.conv(h, 64, 20, name="conv2")])
    return analyze_groups(net.model(net.conv(h, 20, 4, name="head")))


def test_json_round_trip(groups: Groups, tmp_path: Path) -> None:
    plan = random_plan(groups, 0.5, seed=3, round_to=4)
    path = plan.save(tmp_path / "sub" / "plan.json")
    loaded = PruningPlan.load(path)
    assert loaded == plan, "plan changed on a JSON round trip"
    data = json.loads(path.read_text())
    assert data["groups"][0] == {"id": 0, "name": "conv1", "channels": 64, "keep": list(plan.keep[0])}, data
    assert data["criterion"] == "random" and data["ratio"] == 0.5 and data["round_to"] == 4, data
    assert not list(tmp_path.glob("sub/.*.tmp")), "the atomic write left a temp file behind"


def test_plan_of_another_model_is_refused(groups: Groups) -> None:
    plan = PruningPlan("0123456789abcdef", {0: (1, 2)})
    with pytest.raises(PlanError, match=f"plan was made for model with hash 0123456789abcdef, this model has "
                                        f"{groups.model_hash}"):
        plan.validate(groups)


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ({0: (3, 70)}, "group 0 (conv1): index 70 out of range 0..63"),
        ({0: (-1, 2)}, "group 0 (conv1): index -1 out of range 0..63"),
        ({0: ()}, "group 0 (conv1): keeps no channels"),
        ({0: (1, 1, 2)}, "group 0 (conv1): keeps some indices twice"),
        ({9: (1,)}, "plan names group 9, but the model has groups 0..2"),
        ({2: (0, 1)}, "group 2 (head): is not prunable (it reaches the graph output"),
    ],
)
def test_bad_plans_get_clear_errors(groups: Groups, keep: dict, message: str) -> None:
    plan = PruningPlan(groups.model_hash, keep)
    with pytest.raises(PlanError) as info:
        plan.validate(groups)
    assert message in str(info.value), str(info.value)


def test_surgery_validates_before_editing(groups: Groups) -> None:
    net = Net()
    h = net.op("Relu", [net.conv("x", 3, 64, name="conv1")])
    h = net.op("Relu", [net.conv(h, 64, 20, name="conv2")])
    model = net.model(net.conv(h, 20, 4, name="head"))
    with pytest.raises(PlanError, match="keeps no channels"):
        apply_plan(model, PruningPlan(groups.model_hash, {0: (1,), 1: ()}))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not a JSON file"),
        ('{"format": "other"}', "not a splinecompress plan"),
        ('{"format": "splinecompress.plan", "version": 7, "model_hash": "x"}', "plan version 7 is not supported"),
        ('{"format": "splinecompress.plan", "version": 1, "model_hash": "x", "groups": [{"id": 0, "keep": "a"}]}',
         "group 0: \"keep\" must be a list of integers"),
    ],
)
def test_bad_plan_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(PlanError, match=message):
        PruningPlan.load(path)
    with pytest.raises(PlanError, match="no such plan file"):
        PruningPlan.load(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("keep", "channels", "round_to", "expected"),
    [
        (44.8, 64, 8, 48),  # nearest multiple
        (43.0, 64, 8, 40),
        (3.0, 64, 8, 8),  # never below one multiple
        (0.0, 5, 1, 1),  # never 0
        (70.0, 64, 8, 64),  # never above the group
        (10.0, 6, 8, 6),  # a group smaller than round_to keeps everything
        (31.6, 32, 1, 32),
    ],
)
def test_round_channels(keep: float, channels: int, round_to: int, expected: int) -> None:
    assert round_channels(keep, channels, round_to) == expected


def test_round_to_must_be_positive() -> None:
    with pytest.raises(UsageError, match="round_to must be >= 1"):
        round_channels(10, 16, 0)


def test_random_plan_ratio_and_round_to(groups: Groups) -> None:
    plan = random_plan(groups, 0.3, seed=0, round_to=8)
    assert set(plan.keep) == {g.id for g in groups.prunable()}, plan.keep
    assert len(plan.keep[0]) == 48 and len(plan.keep[1]) == 16, {k: len(v) for k, v in plan.keep.items()}
    assert all(list(v) == sorted(set(v)) for v in plan.keep.values()), "kept indices must be sorted and unique"
    assert random_plan(groups, 0.3, seed=0, round_to=8) == plan, "same seed, same plan"
    with pytest.raises(UsageError, match="ratio must be in"):
        random_plan(groups, 1.0)
