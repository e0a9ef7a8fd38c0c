"""The names the package promises exist, and importing it does not pull in torch."""

from __future__ import annotations

import subprocess
import sys

import splinecompress


def test_every_exported_name_exists() -> None:
    missing = [name for name in splinecompress.__all__ if not hasattr(splinecompress, name)]
    assert not missing, f"__all__ names missing from the package: {missing}"
    assert len(set(splinecompress.__all__)) == len(splinecompress.__all__), "duplicates in __all__"


def test_import_does_not_need_torch() -> None:
    code = "import sys, splinecompress, splinecompress.cli.main; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "torch must stay a lazy, optional import"
