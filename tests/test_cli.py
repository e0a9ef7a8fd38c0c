"""The command line as a user meets it: exit codes, one-line errors, no tracebacks, the README's first command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from splinecompress.cli.main import main

from tests.cli_helpers import assert_one_line_error


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script in a fresh process, exactly as a user would."""
    exe = shutil.which("splinecompress")
    command = [exe, *args] if exe else [sys.executable, "-m", "splinecompress.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_inspect_sample(sample_model: Path) -> None:
    result = run_cli("inspect", str(sample_model))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = {" ".join(line.split()) for line in out.splitlines()}
    assert "input input float32 batchx1x28x28" in rows
    assert "output logits float32 batchx10" in rows
    assert "ai.onnx 17" in out
    conv_line = next(line for line in out.splitlines() if line.startswith("Conv "))
    assert conv_line.split()[-1] == "9", f"the sample has 9 convolutions: {conv_line}"
    assert "parameters" in out and "file size" in out
    assert "FLOPs (MACs) 37.2M per sample" in rows
    group_lines = [line for line in out.splitlines() if line.split()[:1] in (["0"], ["6"])]
    assert "/stem/stem.0/Conv" in group_lines[0] and "yes" in group_lines[0]
    assert "no: it reaches the graph output 'logits'" in group_lines[-1], "the logits group is frozen"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "no such file"),
        (b"", "the file is empty"),
        (b"plain text, not a model\n", "not an ONNX file"),
    ],
)
def test_inspect_bad_files(tmp_path: Path, content: bytes | None, needle: str) -> None:
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    assert_one_line_error(run_cli("inspect", str(path)), needle)


def test_inspect_truncated(tmp_path: Path, sample_model: Path) -> None:
    path = tmp_path / "cut.onnx"
    path.write_bytes(sample_model.read_bytes()[:5000])
    assert_one_line_error(run_cli("inspect", str(path)), "truncated")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as no_command:
        main([])
    assert no_command.value.code == 2
    with pytest.raises(SystemExit) as unknown:
        main(["frobnicate"])
    assert unknown.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_export_cli_writes_model(tmp_path: Path, repo_root: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "net.onnx"
    result = run_cli(
        "export",
        "samples.mnist_net:build_mnist_net",
        "-o",
        str(out),
        "--input-shape",
        "1x1x28x28",
        "--dynamic-batch",
        "--keep-batchnorm",
        cwd=repo_root,
    )
    assert result.returncode == 0, result.stderr
    assert "legacy exporter, opset 17, 9 BatchNormalization nodes kept" in result.stdout
    assert "parity with torch" in result.stdout
    inspected = run_cli("inspect", str(out))
    assert "batchx1x28x28" in inspected.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["samples.mnist_net:build_mnist_net", "--input-shape", "1xAx28"], "is not a shape"),
        (["samples.mnist_net:nothing", "--input-shape", "1x1x28x28"], "has no callable 'nothing'"),
        (
            ["samples.mnist_net:build_mnist_net", "--input-shape", "1x1x28x28", "--weights", "missing.pt"],
            "no such file",
        ),
    ],
)
def test_export_cli_bad_input(tmp_path: Path, repo_root: Path, args: list[str], needle: str) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "net.onnx"
    assert_one_line_error(run_cli("export", *args, "-o", str(out), cwd=repo_root), needle)
    assert not out.exists()


def test_plain_install_gives_working_command(tmp_path: Path, repo_root: Path) -> None:
    """`pip install .` (not editable) installs splinecompress.cli and the script, and no top-level `cli`."""
    target = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(repo_root),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    assert (target / "splinecompress" / "cli" / "main.py").is_file()
    for package in (repo_root / "splinecompress").rglob("__init__.py"):
        relative = package.relative_to(repo_root)
        assert (target / relative).is_file(), f"{relative.parent} is not installed: list it in pyproject.toml"
    assert not (target / "cli").exists(), "a top-level `cli` module must not be installed"
    script = target / "bin" / "splinecompress"
    assert script.is_file()
    # Run from an unrelated folder so the checkout itself cannot be imported by accident.
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, str(script), "--version"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("splinecompress ")
    imported = subprocess.run(
        [sys.executable, "-c", "import splinecompress.cli.main as m; print(m.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert imported.stdout.strip().startswith(str(target)), imported.stdout + imported.stderr
