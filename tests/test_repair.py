"""Training-free repair: exact where the maths says it must be, better than no repair where it cannot be exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from splinecompress.calib.calibrate import calibrate
from splinecompress.calib.moments import collect_moments
from splinecompress.calib.runner import create_session
from splinecompress.criteria import CriterionInput, score
from splinecompress.errors import UsageError
from splinecompress.graph.equivalence import check_equivalence
from splinecompress.graph.groups import analyze_groups
from splinecompress.graph.plan import PruningPlan
from splinecompress.graph.surgery import apply_plan
from splinecompress.model import load_model
from splinecompress.policy import make_plan
from splinecompress.repair import lstsq_sinks, repair_model
from tests.zoo import Net, export_zoo_model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = create_session(model, optimize=False)
    return session.run({session.session.get_inputs()[0].name: x})[0]


def plan_removing(groups, gid: int, removed: list[int]) -> PruningPlan:
    channels = groups[gid].channels
    return PruningPlan(groups.model_hash, {gid: tuple(i for i in range(channels) if i not in removed)})


def repaired_slim(
    model, plan, method: str, data, with_moments: bool = False, ridge: float = 1e-3
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    groups = analyze_groups(model)
    stats = calibrate(model, groups, data)
    moments = None
    if with_moments:
        sinks, unsupported = lstsq_sinks(model, groups, plan)
        assert not unsupported, unsupported
        moments = collect_moments(model, sinks, data)
    result = repair_model(model, groups, plan, method=method, stats=stats, moments=moments, ridge=ridge)
    slim = apply_plan(result.model, result.plan).model
    check = check_equivalence(result.model, slim, result.plan)
    assert check.passed, check.describe()
    return result.model, slim


def constant_channel_net(sink: str) -> tuple[onnx.ModelProto, int]:
    """Conv -> Relu -> sink, where channel 1 is a constant 0.7 (zero filter, positive bias)."""
    net = Net(channels=3, size=6, seed=0)
    w = net.rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[1] = 0
    b = np.array([0.1, 0.7, -0.1, 0.2], np.float32)
    h = net.op("Relu", [net.op("Conv", ["x", net.const(w), net.const(b)], "conv1", pads=[1, 1, 1, 1])])
    if sink == "conv":
        out = net.op("Conv", [h, net.const(net.rng.standard_normal((2, 4, 3, 3)))], "conv2")  # no bias, no pads
    elif sink == "gemm":
        flat = net.op("Flatten", [h], axis=1)
        out = net.gemm(flat, 4 * 36, 5, name="fc")
    else:  # a MatMul has no bias input: repair must add one
        flat = net.op("Flatten", [h], axis=1)
        out = net.op("MatMul", [flat, net.const(net.rng.standard_normal((4 * 36, 5)))], "fc")
    return net.model(out), 0


@pytest.mark.parametrize("sink", ["conv", "gemm", "matmul"])
def test_bias_repair_removes_a_constant_channel_exactly(sink: str) -> None:
    model, gid = constant_channel_net(sink)
    x = np.random.default_rng(1).standard_normal((16, 3, 6, 6)).astype(np.float32)
    groups = analyze_groups(model)
    assert groups[gid].prunable, groups[gid].reason
    plan = plan_removing(groups, gid, [1])
    plain = apply_plan(model, plan, groups).model
    _, repaired = repaired_slim(model, plan, "bias", [{"x": x}])
    expected = run(model, x)
    plain_error = np.abs(run(plain, x) - expected).max()
    repaired_error = np.abs(run(repaired, x) - expected).max()
    print(f"{sink}: max error without repair {plain_error:.3g}, with bias repair {repaired_error:.3g}")
    assert plain_error > 0.1, "removing a constant 0.7 channel must change the output"
    assert repaired_error < 1e-4, "bias repair folds a constant channel into the sink exactly"


def scaled_duplicate_net() -> onnx.ModelProto:
    """Conv -> Relu -> 1x1 Conv where channel 3 = 2 x channel 0 (relu(2z) = 2 relu(z)): a mergeable spline."""
    net = Net(channels=3, size=6, seed=2)
    w = net.rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    b = net.rng.standard_normal(5).astype(np.float32) * 0.1
    w[3], b[3] = 2 * w[0], 2 * b[0]
    h = net.op("Relu", [net.op("Conv", ["x", net.const(w), net.const(b)], "conv1", pads=[1, 1, 1, 1])])
    out = net.op("Conv", [h, net.const(net.rng.standard_normal((4, 5, 1, 1))), net.const(np.zeros(4))], "conv2")
    return net.model(out)


def test_lstsq_merges_a_duplicate_channel() -> None:
    model = scaled_duplicate_net()
    groups = analyze_groups(model)
    plan = plan_removing(groups, 0, [3])
    x = np.random.default_rng(3).standard_normal((32, 3, 6, 6)).astype(np.float32)
    expected = run(model, x)
    _, bias_slim = repaired_slim(model, plan, "bias", [{"x": x}])
    _, lstsq_slim = repaired_slim(model, plan, "lstsq", [{"x": x}], with_moments=True)
    _, exact_slim = repaired_slim(model, plan, "lstsq", [{"x": x}], with_moments=True, ridge=1e-9)
    bias_error = np.abs(run(bias_slim, x) - expected).max()
    lstsq_error = np.abs(run(lstsq_slim, x) - expected).max()
    exact_error = np.abs(run(exact_slim, x) - expected).max()
    scale = np.abs(expected).max()
    print(
        f"duplicate channel removed (outputs up to {scale:.3g}): max error bias {bias_error:.3g}, "
        f"lstsq {lstsq_error:.3g}, lstsq with a vanishing ridge {exact_error:.3g}"
    )
    assert lstsq_error < 1e-2 * bias_error, "lstsq folds 2 x channel 0 into channel 0"
    assert exact_error < 1e-4 * scale, "without regularisation the merge is exact"


def test_repair_on_the_sample_ranks_lstsq_over_bias_over_none(
    sample_model: Path, sample_calib: Path, sample_val: Path
) -> None:
    model = load_model(sample_model)
    groups = analyze_groups(model)
    stats = calibrate(model, groups, sample_calib)
    plan = make_plan(
        model, groups, score("spline", CriterionInput(model, groups, stats)), ratio=0.3, exclude=[0, 3, 5]
    ).plan  # block-internal groups, where every repair has something to fix
    val = np.load(sample_val)
    accuracy = {}
    for method in ("none", "bias", "lstsq"):
        moments = None
        if method == "lstsq":
            moments = collect_moments(model, lstsq_sinks(model, groups, plan)[0], sample_calib)
        result = repair_model(model, groups, plan, method=method, stats=stats, moments=moments)
        slim = apply_plan(result.model, result.plan).model
        accuracy[method] = float(np.mean(run(slim, val["input"]).argmax(1) == val["labels"]))
    print(f"sample, spline 30% of block-internal channels: {accuracy}")
    assert accuracy["lstsq"] >= accuracy["bias"] > accuracy["none"]
    assert accuracy["lstsq"] >= 0.98


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "densenet121"])
def test_lstsq_reduces_output_error_on_zoo(name: str, zoo_dir: Path) -> None:
    """On real architectures (stride-2 3x3 convs, 1x1 convs, concatenations, Flatten -> Gemm), least squares
    brings the pruned model closer to the original than no repair, on the data it was fitted on."""
    model = load_model(export_zoo_model(name, zoo_dir))
    groups = analyze_groups(model)
    x = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    data = [{"input": x}]
    stats = calibrate(model, groups, data, max_positions=4000)
    plan = make_plan(model, groups, score("l1", CriterionInput(model, groups)), ratio=0.3).plan
    expected = run(model, x)
    errors = {}
    for method in ("none", "lstsq"):
        sinks, _ = lstsq_sinks(model, groups, plan)
        moments = collect_moments(model, sinks, data) if method == "lstsq" else None
        result = repair_model(model, groups, plan, method=method, stats=stats, moments=moments)
        slim = apply_plan(result.model, result.plan).model
        errors[method] = float(np.linalg.norm(run(slim, x) - expected) / np.linalg.norm(expected))
    print(f"{name}: relative output error {errors}")
    assert errors["lstsq"] < errors["none"]


def test_repair_errors(sample_model: Path) -> None:
    model = load_model(sample_model)
    groups = analyze_groups(model)
    plan = plan_removing(groups, 1, [0, 1])
    with pytest.raises(UsageError, match="repair 'magic' is not one of none, bias, lstsq"):
        repair_model(model, groups, plan, method="magic")
    with pytest.raises(UsageError, match="needs calibration statistics"):
        repair_model(model, groups, plan, method="bias")
    assert repair_model(model, groups, plan, method="none").model is model


def test_lstsq_on_a_gemm_sink_equals_the_closed_form() -> None:
    """x -> Gemm(8) -> Relu -> Gemm(3): the repaired second Gemm is the ridge regression of its output on the kept
    features plus a constant, solved here directly from the same activations."""
    net = Net(channels=1, size=1, seed=4)
    net.input = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 6])
    hidden = net.op("Relu", [net.gemm("x", 6, 8, name="fc1")])
    model = net.model(net.gemm(hidden, 8, 3, name="fc2"))
    groups = analyze_groups(model)
    removed = [2, 5]
    plan = plan_removing(groups, 0, removed)
    x = np.random.default_rng(5).standard_normal((300, 6)).astype(np.float32)
    ridge = 1e-3
    repaired, _ = repaired_slim(model, plan, "lstsq", [{"x": x}], with_moments=True, ridge=ridge)

    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    fc1, fc2 = (next(n for n in model.graph.node if n.name == name) for name in ("fc1", "fc2"))
    h = np.maximum(x.astype(np.float64) @ weights[fc1.input[1]].T + weights[fc1.input[2]], 0)
    kept = [i for i in range(8) if i not in removed]
    z = np.concatenate([h[:, kept], np.ones((len(h), 1))], axis=1)
    gram = z.T @ z / len(z)
    gram[np.arange(len(kept)), np.arange(len(kept))] += ridge * np.mean(np.diag(gram)[:-1])
    target = h @ weights[fc2.input[1]].T.astype(np.float64)  # W x, bias excluded
    solution = np.linalg.solve(gram, z.T @ target / len(z)).T  # [3, |K| + 1]

    new = {t.name: onnx.numpy_helper.to_array(t) for t in repaired.graph.initializer}
    fc2_new = next(n for n in repaired.graph.node if n.name == "fc2")
    np.testing.assert_allclose(new[fc2_new.input[1]][:, kept], solution[:, :-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new[fc2_new.input[2]], weights[fc2.input[2]] + solution[:, -1], rtol=1e-4, atol=1e-5)


def test_lstsq_beats_no_repair_on_the_sample_at_half(sample_model: Path, sample_calib: Path, sample_val: Path) -> None:
    from splinecompress.sweep import prepare, sweep

    prepared = prepare(sample_model, sample_calib)
    none, lstsq = (sweep(prepared, sample_val, [0.5], repair=r)[0] for r in ("none", "lstsq"))
    print(f"sample, spline, ratio 0.5: accuracy {none.accuracy:.4f} without repair, {lstsq.accuracy:.4f} with lstsq")
    assert lstsq.accuracy > none.accuracy
    assert lstsq.flops_kept == pytest.approx(none.flops_kept)


def test_prune_cli_with_repair(sample_model: Path, sample_calib: Path, sample_val: Path, tmp_path: Path) -> None:
    """analyze -> plan -> prune --repair, as the README shows it; the slim model is still verified."""
    import subprocess
    import sys

    cli = [sys.executable, "-m", "splinecompress.cli"]
    stats, plan, slim = tmp_path / "stats.npz", tmp_path / "plan.json", tmp_path / "slim.onnx"
    steps = [
        ["analyze", str(sample_model), "--calib", str(sample_calib), "-o", str(stats)],
        ["plan", str(sample_model), "--stats", str(stats), "--ratio", "0.3", "-o", str(plan)],
        [
            "prune",
            str(sample_model),
            "--plan",
            str(plan),
            "--repair",
            "lstsq",
            "--stats",
            str(stats),
            "--calib",
            str(sample_calib),
            "-o",
            str(slim),
        ],
    ]
    for step in steps:
        done = subprocess.run([*cli, *step], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    assert "equivalent to the masked original" in done.stdout and "sinks repaired" in done.stdout
    val = np.load(sample_val)
    accuracy = float(np.mean(run(load_model(slim), val["input"]).argmax(1) == val["labels"]))
    assert accuracy >= 0.975, f"lstsq-repaired slim model at ratio 0.3: {accuracy:.4f}"
    missing = subprocess.run(
        [*cli, "prune", str(sample_model), "--plan", str(plan), "--repair", "bias", "-o", str(tmp_path / "x.onnx")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert missing.returncode == 2 and "needs --stats" in missing.stderr
