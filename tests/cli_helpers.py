"""Helpers shared by the command-line tests."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run the command line in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "splinecompress.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    """Bad input: exit 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, f"bad input must exit 2, got {result.returncode}: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got: {result.stderr}"
    assert needle in lines[0], f"'{needle}' not in: {lines[0]}"
