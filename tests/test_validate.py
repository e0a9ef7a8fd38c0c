"""Validation: accuracy, agreement and output differences equal a direct onnxruntime computation; latency; CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from splinecompress.calib.runner import expose_tensors
from splinecompress.errors import CalibrationDataError, UsageError
from splinecompress.model import load_model
from splinecompress.report import comparison_rows, format_comparison, write_report_json
from splinecompress.validate import ModelMeasurement, ValidationReport, validate
from tests.cli_helpers import assert_one_line_error, run_cli

# Few timed runs: the tests check the plumbing, not the machine.
FAST = {"warmup": 1, "repeats": 5}


def ort_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    """All outputs of a model on the whole array in one plain onnxruntime run."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


@pytest.fixture(scope="module")
def val(sample_val: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(sample_val) as archive:
        return archive["input"], archive["labels"]


@pytest.fixture(scope="module")
def perturbed(sample_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample model with noise on the final layer's weight: most, not all, predictions survive."""
    model = onnx.load(str(sample_model))
    weight = next(t for t in model.graph.initializer if t.name == "fc.weight")
    w = numpy_helper.to_array(weight)
    noisy = w + np.random.default_rng(0).normal(0, 0.5 * w.std(), w.shape).astype(w.dtype)
    weight.CopyFrom(numpy_helper.from_array(noisy, "fc.weight"))
    path = tmp_path_factory.mktemp("validate") / "perturbed.onnx"
    onnx.save(model, str(path))
    return path


def with_fixed_batch(sample_model: Path, path: Path, batch: int) -> Path:
    model = onnx.load(str(sample_model))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, str(path))
    return path


def test_accuracy_matches_direct_computation(sample_model: Path, sample_val: Path, val) -> None:
    x, labels = val
    report = validate(sample_model, sample_val, measure_latency=False)
    direct = float(np.mean(ort_outputs(sample_model, x)[0].argmax(axis=1) == labels))
    print(f"sample model accuracy: validate {report.model.accuracy:.4f}, direct onnxruntime {direct:.4f}")
    assert report.model.accuracy == direct, f"{report.model.accuracy} != direct {direct}"
    assert report.samples == len(x) == 1000, report.samples
    assert report.reference is None and report.agreement is None and report.max_abs_diff is None
    assert report.model.latency_ms_median is None and report.repeats == 0, "latency was not asked for"
    assert report.model.params == 307402 and report.model.flops and report.model.file_bytes > 0, report.model


def test_self_comparison_and_latency(sample_model: Path, sample_val: Path) -> None:
    report = validate(sample_model, sample_val, reference=sample_model, **FAST)
    assert report.agreement == 1.0, report.agreement
    assert report.max_abs_diff == 0.0 and report.mean_abs_diff == 0.0, (report.max_abs_diff, report.mean_abs_diff)
    assert report.model.accuracy == report.reference.accuracy, "the same model scores the same"
    for m in (report.model, report.reference):
        assert m.latency_ms_median > 0, m
        assert m.latency_ms_p90 >= m.latency_ms_median, m
    assert report.provider in ("cpu", "cuda") and report.threads == 1 and report.latency_batch == 1, report
    assert (report.warmup, report.repeats) == (1, 5), report


def test_perturbed_copy_matches_direct_computation(sample_model: Path, perturbed: Path, sample_val: Path, val) -> None:
    x, labels = val
    # batch 37 leaves a short last batch, so batching must not change any count
    report = validate(perturbed, sample_val, reference=sample_model, batch_size=37, measure_latency=False)
    slim, original = ort_outputs(perturbed, x)[0], ort_outputs(sample_model, x)[0]
    agreement = float(np.mean(slim.argmax(axis=1) == original.argmax(axis=1)))
    diff = np.abs(slim.astype(np.float64) - original)
    print(f"perturbed copy: agreement {report.agreement:.4f} (direct {agreement:.4f}), max diff {diff.max():.4f}")
    assert 0.5 < report.agreement < 1.0, f"the perturbation should flip some predictions: {report.agreement}"
    assert report.agreement == agreement, f"{report.agreement} != direct {agreement}"
    assert report.max_abs_diff == pytest.approx(diff.max(), abs=1e-5), (report.max_abs_diff, diff.max())
    assert report.mean_abs_diff == pytest.approx(diff.mean(), rel=1e-4), (report.mean_abs_diff, diff.mean())
    assert report.model.accuracy == float(np.mean(slim.argmax(axis=1) == labels)), report.model.accuracy
    assert report.reference.accuracy == float(np.mean(original.argmax(axis=1) == labels)), report.reference.accuracy


def test_all_outputs_differences_first_output_agreement(sample_model: Path, perturbed: Path, tmp_path: Path, val):
    """Two outputs: the logits first, then the pooled features the final layer reads (unchanged by the noise)."""
    x, _ = val
    x = x[:200]
    paths = []
    for name, source in (("two_out.onnx", sample_model), ("two_out_perturbed.onnx", perturbed)):
        model = expose_tensors(load_model(source), ["/flatten/Flatten_output_0"])
        onnx.save(model, str(tmp_path / name))
        paths.append(tmp_path / name)
    report = validate(paths[1], [{"input": x}], reference=paths[0], measure_latency=False)
    slim, original = ort_outputs(paths[1], x), ort_outputs(paths[0], x)
    agreement = float(np.mean(slim[0].argmax(axis=1) == original[0].argmax(axis=1)))
    diffs = [np.abs(a.astype(np.float64) - b) for a, b in zip(slim, original, strict=True)]
    mean = sum(float(d.sum()) for d in diffs) / sum(d.size for d in diffs)
    assert report.agreement == agreement, (report.agreement, agreement)
    assert report.max_abs_diff == pytest.approx(max(float(d.max()) for d in diffs), abs=1e-5), report.max_abs_diff
    assert report.mean_abs_diff == pytest.approx(mean, rel=1e-4), "the mean runs over every element of every output"
    assert report.model.accuracy is None, "no labels, no accuracy"


def test_fixed_batch_padding_is_ignored(sample_model: Path, sample_val: Path, tmp_path: Path) -> None:
    fixed = with_fixed_batch(sample_model, tmp_path / "fixed8.onnx", 8)
    data = {"input": np.load(sample_val)["input"][:45], "labels": np.load(sample_val)["labels"][:45]}
    plain = validate(sample_model, [data], measure_latency=False)
    # 45 samples in batches of 8: the last batch holds 3 real rows and 5 padding rows.
    for model, reference in ((fixed, sample_model), (sample_model, fixed)):
        report = validate(model, [data], reference=reference, **FAST)
        assert report.samples == 45 and report.batch_size == 8, (report.samples, report.batch_size)
        assert report.latency_batch == 8, "a fixed batch dimension sets the latency batch"
        assert report.model.accuracy == plain.model.accuracy, (report.model.accuracy, plain.model.accuracy)
        assert report.agreement == 1.0 and report.max_abs_diff == 0.0, report


def test_reference_checks(sample_model: Path, sample_val: Path, tmp_path: Path) -> None:
    fixed = with_fixed_batch(sample_model, tmp_path / "fixed4.onnx", 4)
    other = with_fixed_batch(sample_model, tmp_path / "fixed5.onnx", 5)
    with pytest.raises(UsageError, match=r"input 'input' is 4x1x28x28 in .* but 5x1x28x28 in reference"):
        validate(fixed, sample_val, reference=other, measure_latency=False)
    extra = expose_tensors(load_model(sample_model), ["/flatten/Flatten_output_0"])
    onnx.save(extra, str(tmp_path / "extra.onnx"))
    with pytest.raises(UsageError, match=r"has 2 output\(s\), .* has 1"):
        validate(sample_model, sample_val, reference=tmp_path / "extra.onnx", measure_latency=False)
    swapped = onnx.ModelProto()
    swapped.CopyFrom(extra)
    swapped.graph.output[0].CopyFrom(extra.graph.output[1])
    swapped.graph.output[1].CopyFrom(extra.graph.output[0])
    onnx.save(swapped, str(tmp_path / "swapped.onnx"))
    with pytest.raises(UsageError, match=r"output 'logits' has shape \(32, 10\) but the reference .* has \(32, 128\)"):
        validate(tmp_path / "extra.onnx", sample_val, reference=tmp_path / "swapped.onnx", measure_latency=False)


def test_bad_labels_and_arguments(sample_model: Path, val) -> None:
    x, _ = val
    with pytest.raises(CalibrationDataError, match=r"labels range 0\.\.10, but the model scores 10 classes"):
        validate(sample_model, [{"input": x[:4], "labels": np.array([0, 1, 2, 10])}], measure_latency=False)
    with pytest.raises(UsageError, match="latency batch 0 must be at least 1"):
        validate(sample_model, [{"input": x[:4]}], latency_batch=0)
    with pytest.raises(UsageError, match="repeats >= 1"):
        validate(sample_model, [{"input": x[:4]}], repeats=0)


def test_comparison_table() -> None:
    def measurement(params: int, ms: float, accuracy: float) -> ModelMeasurement:
        return ModelMeasurement("m.onnx", params, 2 * params, 4 * params, ms, 1.5 * ms, accuracy)

    report = ValidationReport(
        model=measurement(518, 0.25, 0.986),
        reference=measurement(1000, 0.5, 0.989),
        agreement=0.991,
        max_abs_diff=0.5,
        mean_abs_diff=0.01,
        samples=1000,
        provider="cpu",
        threads=1,
        batch_size=32,
        latency_batch=1,
        warmup=10,
        repeats=50,
    )
    rows = {row[0]: row[1:] for row in comparison_rows(report)}
    assert rows["parameters"] == ("1k", "518", "-48.2%"), rows["parameters"]
    assert rows["FLOPs (MACs)"][2] == "-48.2%", rows["FLOPs (MACs)"]
    assert rows["latency median"] == ("0.500 ms", "0.250 ms", "x2.00"), rows["latency median"]
    assert rows["accuracy"] == ("98.90%", "98.60%", "-0.3 pt"), rows["accuracy"]
    assert rows["top-1 agreement"][1] == "99.10%", rows["top-1 agreement"]
    text = format_comparison(report)
    assert text.splitlines()[0].split() == ["metric", "original", "slim", "change"], text
    assert "provider cpu" in text and "1 thread(s)" in text and "50 runs after 10 warm-up" in text, text

    single = ValidationReport(**{**report.__dict__, "reference": None, "agreement": None})
    single_rows = comparison_rows(single)
    assert all(len(r) == 2 for r in single_rows), single_rows
    assert "top-1 agreement" not in {r[0] for r in single_rows}, single_rows


def test_json_roundtrip(tmp_path: Path, sample_model: Path, sample_val: Path) -> None:
    report = validate(sample_model, sample_val, reference=sample_model, measure_latency=False)
    path = write_report_json(report, tmp_path / "out" / "report.json")
    loaded = json.loads(path.read_text())
    assert loaded == report.to_dict(), loaded
    assert loaded["reference"]["accuracy"] == loaded["model"]["accuracy"] == 0.989, loaded
    assert [p.name for p in path.parent.iterdir()] == ["report.json"], "no temporary file is left behind"


def test_cli_validate(sample_model: Path, sample_val: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = run_cli(
        "validate", str(sample_model), "--data", str(sample_val), "--reference", str(sample_model), "--json", str(out),
        "--repeats", "5", "--warmup", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == ["metric", "original", "slim", "change"], result.stdout
    assert "top-1 agreement" in result.stdout and "100.00%" in result.stdout, result.stdout
    report = json.loads(out.read_text())
    assert report["agreement"] == 1.0 and report["repeats"] == 5, report
    assert report["model"]["latency_ms_p90"] >= report["model"]["latency_ms_median"] > 0, report


def test_cli_validate_no_latency(sample_model: Path, sample_val: Path) -> None:
    result = run_cli("validate", str(sample_model), "--data", str(sample_val), "--no-latency")
    assert result.returncode == 0, result.stderr
    assert "latency not measured" in result.stdout and "98.90%" in result.stdout, result.stdout


def renamed_input(sample_model: Path, path: Path) -> Path:
    model = onnx.load(str(sample_model))
    model.graph.input[0].name = "image"
    for node in model.graph.node:
        node.input[:] = ["image" if name == "input" else name for name in node.input]
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("case", ["missing data", "reference input name", "wrong shape"])
def test_cli_validate_bad_input(case: str, sample_model: Path, sample_val: Path, tmp_path: Path) -> None:
    args = [str(sample_model), "--data", str(sample_val), "--no-latency"]
    if case == "missing data":
        args[2] = str(tmp_path / "missing.npz")
        needle = "missing.npz: no such file"
    elif case == "reference input name":
        args += ["--reference", str(renamed_input(sample_model, tmp_path / "renamed.onnx"))]
        needle = "takes input(s) ['image']"
    else:
        np.savez(tmp_path / "small.npz", input=np.zeros((4, 1, 14, 14), np.float32))
        args[2] = str(tmp_path / "small.npz")
        needle = "dimension 2 is 14, must be 28"
    assert_one_line_error(run_cli("validate", *args), needle)
