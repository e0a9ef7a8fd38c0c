"""The bundled sample is what samples/README.md says it is: a real, accurate model and disjoint real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from splinecompress.model import describe_model, load_model


def test_sample_model_accuracy(sample_model: Path, sample_val: Path) -> None:
    val = np.load(sample_val)
    assert val["input"].shape == (1000, 1, 28, 28) and val["input"].dtype == np.float32
    session = ort.InferenceSession(str(sample_model), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": val["input"]})[0]
    accuracy = float(np.mean(logits.argmax(axis=1) == val["labels"]))
    print(f"sample val accuracy: {accuracy:.4f}")
    assert accuracy >= 0.98, f"the sample must reach 98% on its validation split, got {accuracy:.2%}"


def test_sample_is_a_residual_bn_relu_cnn(sample_model: Path) -> None:
    info = describe_model(load_model(sample_model))
    assert info.op_counts["Conv"] == 9 and info.op_counts["Relu"] == 7 and info.op_counts["Add"] == 3
    assert info.inputs[0].shape == ("batch", 1, 28, 28)


def test_splits_are_disjoint_and_small(repo_root: Path) -> None:
    splits = {name: np.load(repo_root / "samples" / f"mnist_{name}.npz")["input"] for name in ("train", "calib", "val")}
    assert {k: len(v) for k, v in splits.items()} == {"train": 3500, "calib": 500, "val": 1000}
    seen: dict[bytes, str] = {}
    for name, images in splits.items():
        for image in images:
            key = image.tobytes()
            assert seen.get(key, name) == name, f"an image of {name} also appears in {seen[key]}"
            seen[key] = name
    total = sum(p.stat().st_size for p in (repo_root / "samples").rglob("*") if p.is_file())
    assert total < 10 * 2**20, f"samples/ is {total} bytes; keep it under 10 MB"
