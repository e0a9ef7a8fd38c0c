"""Analysis + plan + surgery + equivalence on a zoo of real architectures exported by our exporter.

For every model: a random plan removing about 30% of every prunable group must give a model that passes the
full checker, has fewer parameters and MACs, and equals the masked original (relative error <= 1e-4) while
differing from the unmasked original (so the comparison is not vacuous). The exported files are cached for the
test session.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from splinecompress.cli.main import main

from splinecompress.graph.equivalence import _run, check_equivalence, random_inputs
from splinecompress.graph.groups import analyze_groups, group_summary
from splinecompress.graph.plan import PruningPlan, random_plan
from splinecompress.graph.surgery import apply_plan
from splinecompress.model import graph_hash, load_model, save_model
from tests.zoo import ZOO, export_zoo_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

# Lowest acceptable share of MACs in nodes that touch a prunable group: a regression guard on the analysis.
MIN_PRUNABLE_SHARE = 0.95

# The only reason a zoo group may be frozen: it reaches the logits.
EXPECTED_FROZEN = ("reaches the graph output",)


def _zoo_model(name: str, zoo_dir: Path) -> Path:
    if name == "mnist_sample":
        return Path(__file__).resolve().parents[1] / "samples" / "mnist_cnn.onnx"
    return export_zoo_model(name, zoo_dir)


@pytest.mark.parametrize("name", [*ZOO, "mnist_sample"])
def test_zoo_random_plan_is_equivalent(name: str, zoo_dir: Path, record_property) -> None:
    path = _zoo_model(name, zoo_dir)
    model = load_model(path)
    hash_before = graph_hash(model)
    groups = analyze_groups(model)
    assert groups.prunable(), f"{name}: no prunable group found"
    assert not groups[len(groups) - 1].prunable, f"{name}: the logits group is prunable"
    summary = group_summary(model, groups)
    share = summary.prunable_flops_fraction
    record_property("prunable_flops_share", round(share, 4))
    assert share >= MIN_PRUNABLE_SHARE, f"{name}: prunable FLOPs share {share:.3f} is too low"
    for g in groups:
        assert g.prunable or any(r in g.reason for r in EXPECTED_FROZEN), f"{name}: {g.label} frozen: {g.reason}"
    for g in groups:
        assert g.prunable == (g.reason is None), f"{name}: {g.label} prunable={g.prunable} reason={g.reason}"
        assert g.probes, f"{name}: {g.label} has no probe tensors"

    plan = random_plan(groups, 0.3, seed=7)
    result = apply_plan(model, plan, groups)  # runs the full checker
    assert graph_hash(model) == hash_before, f"{name}: surgery modified its input model"
    assert result.params_after < result.params_before, f"{name}: params did not drop"
    assert result.macs_after < result.macs_before, f"{name}: MACs did not drop"
    slim_names = {n.name for n in result.model.graph.node}
    assert slim_names <= {n.name for n in model.graph.node}, f"{name}: surgery renamed or added nodes"

    check = check_equivalence(model, result.model, plan, groups, seed=3)
    record_property("max_rel", check.max_rel)
    assert check.passed, f"{name}: {check.describe()}"
    # the comparison must not be vacuous: the slim model differs from the unmasked original
    feeds = random_inputs(model, seed=3)
    unmasked, slim = _run(model, feeds)[0], _run(result.model, feeds)[0]
    assert np.max(np.abs(unmasked - slim)) > 1e3 * check.max_abs + 1e-6, f"{name}: pruning changed nothing"


@pytest.mark.parametrize("name", ["mnist", "mobilenet_v3_small"])
def test_dynamo_exports_prune_too(name: str, zoo_dir: Path) -> None:
    pytest.importorskip("onnxscript")
    # mnist keeps BatchNorm, so its dynamo graph is unoptimised (computed zero biases, Concat-built shapes)
    model = load_model(export_zoo_model(name, zoo_dir, dynamo=True))
    groups = analyze_groups(model)
    for g in groups:
        assert g.prunable or "reaches the graph output" in g.reason, f"{name}: {g.label} frozen: {g.reason}"
    plan = random_plan(groups, 0.3, seed=5)
    result = apply_plan(model, plan, groups)
    assert result.macs_after < result.macs_before
    check = check_equivalence(model, result.model, plan, groups)
    assert check.passed, f"{name} (dynamo): {check.describe()}"


def test_slim_model_round_trips_through_a_file(zoo_dir: Path, tmp_path: Path) -> None:
    model = load_model(export_zoo_model("resnet18", zoo_dir))
    groups = analyze_groups(model)
    plan = random_plan(groups, 0.5, seed=1, round_to=8)
    slim = apply_plan(model, plan, groups).model
    path = save_model(slim, tmp_path / "slim.onnx")
    reloaded = load_model(path)
    assert graph_hash(reloaded) == graph_hash(slim), "the saved slim model differs from the one in memory"
    # kept counts are multiples of 8 wherever the group is large enough
    for gid, kept in plan.keep.items():
        assert len(kept) % 8 == 0 or len(kept) == groups[gid].channels, f"group {gid} keeps {len(kept)}"
    # the slim model can be analysed and pruned again
    again = analyze_groups(reloaded)
    assert len(again.prunable()) == len(groups.prunable()), "re-analysis of the slim model found other groups"


def test_shared_weights_are_copied_not_sliced_in_place(zoo_dir: Path) -> None:
    # regnet keeps BatchNorm at its default init, so the exporter shares identical folded biases between convs
    model = load_model(export_zoo_model("regnet_x_400mf", zoo_dir))
    identity_inputs = [n.input[0] for n in model.graph.node if n.op_type == "Identity"]
    assert identity_inputs, "expected the exporter to share weights through Identity nodes"
    groups = analyze_groups(model)
    plan = random_plan(groups, 0.3, seed=2)
    result = apply_plan(model, plan, groups)
    assert check_equivalence(model, result.model, plan, groups).passed


def test_prune_cli_writes_a_verified_model(zoo_dir: Path, tmp_path: Path, capsys) -> None:
    model_path = export_zoo_model("mnist", zoo_dir)
    model = load_model(model_path)
    plan_path = random_plan(analyze_groups(model), 0.5, seed=0).save(tmp_path / "plan.json")
    out = tmp_path / "slim.onnx"
    code = main(["prune", str(model_path), "--plan", str(plan_path), "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "equivalent to the masked original" in text, text
    slim = load_model(out)
    assert sum(np.prod(t.dims) for t in slim.graph.initializer) < sum(np.prod(t.dims) for t in model.graph.initializer)


def test_prune_cli_exits_1_when_the_check_fails(zoo_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import splinecompress.graph.equivalence as equivalence
    from splinecompress.graph.equivalence import EquivalenceResult

    monkeypatch.setattr(equivalence, "check_equivalence",
                        lambda *a, **k: EquivalenceResult(1.0, 1.0, 1e-4, False, ("logits",)))
    model_path = export_zoo_model("mnist", zoo_dir)
    plan_path = random_plan(analyze_groups(load_model(model_path)), 0.5).save(tmp_path / "plan.json")
    out = tmp_path / "slim.onnx"
    code = main(["prune", str(model_path), "--plan", str(plan_path), "-o", str(out)])
    assert code == 1, "a failed equivalence check must exit 1"
    assert not out.exists(), "a model that failed the check must not be written"
    assert "does not match" in capsys.readouterr().err
    code = main(["prune", str(model_path), "--plan", str(plan_path), "-o", str(out), "--no-verify"])
    assert code == 0 and out.exists(), "--no-verify skips the check"


def test_prune_cli_refuses_a_plan_of_another_model(zoo_dir: Path, tmp_path: Path, capsys) -> None:
    mnist = export_zoo_model("mnist", zoo_dir)
    other = export_zoo_model("conv_flatten_gemm", zoo_dir)
    plan_path = random_plan(analyze_groups(load_model(other)), 0.5).save(tmp_path / "plan.json")
    code = main(["prune", str(mnist), "--plan", str(plan_path), "-o", str(tmp_path / "slim.onnx")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "plan was made for model with hash" in err and len(err.strip().splitlines()) == 1, err


def test_plan_file_is_tied_to_the_model(zoo_dir: Path, tmp_path: Path) -> None:
    model = load_model(export_zoo_model("conv_flatten_gemm", zoo_dir))
    groups = analyze_groups(model)
    plan = random_plan(groups, 0.3, seed=4)
    loaded = PruningPlan.load(plan.save(tmp_path / "p.json"))
    assert loaded == plan, "plan changed on a JSON round trip"
    assert apply_plan(model, loaded, groups).modified
