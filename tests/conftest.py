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
