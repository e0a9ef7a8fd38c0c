"""The main job from the command line: defaults that work, gates that exit 1, bad input that exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from splinecompress.compress import compress
from splinecompress.model import describe_model, load_model

CLI = [sys.executable, "-m", "splinecompress.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)


def test_readme_compress_command(sample_model: Path, sample_calib: Path, sample_val: Path, tmp_path: Path) -> None:
    """The README's first command, on the bundled sample: a smaller model, a table, accuracy kept."""
    slim = tmp_path / "slim.onnx"
    report = tmp_path / "report.json"
    result = run_cli(
        "compress",
        str(sample_model),
        "--calib",
        str(sample_calib),
        "--val",
        str(sample_val),
        "-o",
        str(slim),
        "--report",
        str(report),
    )
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    for row in ("parameters", "FLOPs (MACs)", "file size", "latency median", "accuracy", "top-1 agreement"):
        assert row in result.stdout, f"row '{row}' missing from the table"
    assert "equivalent to the masked original" in result.stdout
    data = json.loads(report.read_text())
    validation = data["validation"]
    assert data["gates_passed"] and data["criterion"] == "spline" and data["repair"] == "lstsq"
    assert validation["model"]["params"] < 0.7 * validation["reference"]["params"]
    assert validation["model"]["accuracy"] >= validation["reference"]["accuracy"] - 0.01
    assert describe_model(load_model(slim)).inputs[0].shape == ("batch", 1, 28, 28)


def test_only_model_calib_and_output_does_something_good(
    sample_model: Path, sample_calib: Path, tmp_path: Path
) -> None:
    slim = tmp_path / "slim.onnx"
    result = compress(sample_model, sample_calib, slim, measure_latency=False)
    assert result.passed and slim.is_file()
    # 30% by default; rounding to multiples of 8 moves each group by at most 4 channels.
    assert result.removed_fraction == pytest.approx(0.3, abs=0.05)
    assert all(kept % 8 == 0 for kept, _ in result.group_channels.values())
    assert result.validation.agreement >= 0.97, "default settings keep the model's decisions"
    assert result.validation.model.flops < 0.8 * result.validation.reference.flops


def test_gate_failure_exits_1_and_keeps_the_file(
    sample_model: Path, sample_calib: Path, sample_val: Path, tmp_path: Path
) -> None:
    slim = tmp_path / "slim.onnx"
    report = tmp_path / "report.json"
    result = run_cli(
        "compress",
        str(sample_model),
        "--calib",
        str(sample_calib),
        "--val",
        str(sample_val),
        "--ratio",
        "0.8",
        "--repair",
        "none",
        "--max-accuracy-drop",
        "0.01",
        "--no-latency",
        "-o",
        str(slim),
        "--report",
        str(report),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "GATE FAILED: accuracy dropped by" in result.stdout
    assert slim.is_file(), "a failed gate still writes the slim model"
    data = json.loads(report.read_text())
    assert not data["gates_passed"] and "accuracy dropped" in data["gate_failures"][0]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--ratio", "1.5"], "ratio 1.5 is out of range"),
        (["--flops-target", "0"], "FLOPs target 0.0 is out of range"),
        (["--min-agreement", "2"], "min_agreement 2.0 is out of range"),
        (["--max-accuracy-drop", "0.01"], "needs labels"),
    ],
)
def test_bad_options_exit_2(
    sample_model: Path, sample_calib: Path, tmp_path: Path, extra: list[str], needle: str
) -> None:
    slim = tmp_path / "slim.onnx"
    result = run_cli(
        "compress", str(sample_model), "--calib", str(sample_calib), "--no-latency", "-o", str(slim), *extra
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("problem", ["not_onnx", "wrong_shape", "empty", "wrong_dtype"])
def test_bad_files_exit_2_and_write_nothing(
    sample_model: Path, sample_calib: Path, tmp_path: Path, problem: str
) -> None:
    model, calib = sample_model, sample_calib
    if problem == "not_onnx":
        model = tmp_path / "model.onnx"
        model.write_text("hello")
    elif problem == "wrong_shape":
        calib = tmp_path / "calib.npz"
        np.savez(calib, input=np.zeros((4, 1, 32, 32), np.float32))
    elif problem == "empty":
        calib = tmp_path / "calib.npz"
        np.savez(calib, input=np.zeros((0, 1, 28, 28), np.float32))
    else:
        calib = tmp_path / "calib.npz"
        np.savez(calib, input=np.zeros((4, 1, 28, 28), np.float64))
    slim = tmp_path / "slim.onnx"
    result = run_cli("compress", str(model), "--calib", str(calib), "-o", str(slim))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not slim.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".slim")], "no temp file left behind"


def test_plot_command_draws_a_sweep(sample_model: Path, sample_calib: Path, sample_val: Path, tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    result = run_cli(
        "plot",
        str(sample_model),
        "--calib",
        str(sample_calib),
        "--val",
        str(sample_val),
        "--ratios",
        "0.2,0.5",
        "-o",
        str(png),
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("0.20", "0.50"))]
    assert len(lines) == 2, result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_cli(
        "plot",
        str(sample_model),
        "--calib",
        str(sample_calib),
        "--val",
        str(sample_val),
        "--ratios",
        "half",
        "-o",
        str(png),
    )
    assert bad.returncode == 2 and "must be comma-separated numbers" in bad.stderr


def test_verbose_compress_lists_groups(sample_model: Path, sample_calib: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *CLI,
            "-v",
            "compress",
            str(sample_model),
            "--calib",
            str(sample_calib),
            "--no-latency",
            "--ratio",
            "0.5",
            "-o",
            str(tmp_path / "slim.onnx"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    header = next(i for i, r in enumerate(rows) if r[:2] == ["group", "first"])
    groups = [r for r in rows[header + 2 : header + 8]]
    assert [r[0] for r in groups] == ["0", "1", "2", "3", "4", "5"], result.stdout
    for r in groups:
        kept, total = int(r[-3]), int(r[-2])
        assert kept % 8 == 0 and kept < total, f"group {r[0]} keeps {kept} of {total}"
