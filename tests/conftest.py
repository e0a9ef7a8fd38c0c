"""Shared fixtures. Nothing here downloads anything: model hubs are switched off for the whole run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def sample_model() -> Path:
    return SAMPLES / "mnist_cnn.onnx"


@pytest.fixture(scope="session")
def sample_val() -> Path:
    return SAMPLES / "mnist_val.npz"


@pytest.fixture(scope="session")
def sample_calib() -> Path:
    return SAMPLES / "mnist_calib.npz"


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the zoo's exported models, shared by every test module (exports are cached there)."""
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def sample(sample_model: Path, sample_calib: Path):
    """The bundled sample loaded, analysed and calibrated: (model, groups, stats). Tests must not keep edits."""
    from splinecompress.calib.calibrate import calibrate
    from splinecompress.graph.groups import analyze_groups
    from splinecompress.model import load_model

    model = load_model(sample_model)
    groups = analyze_groups(model)
    return model, groups, calibrate(model, groups, sample_calib)
