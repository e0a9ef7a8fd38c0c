"""The tree stays ruff clean: the same check CI and contributors run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def test_ruff_clean(repo_root: Path) -> None:
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: it is part of the test extra (pip install -e '.[test]')")
    result = subprocess.run([ruff, "check", "--no-cache", "."], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
