"""Loading and saving ONNX files: every bad file gets its own clear error; saving never leaves half a file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from splinecompress import model as model_io
from splinecompress.errors import ModelLoadError
from splinecompress.model import describe_model, graph_hash, load_model, save_model


def tiny_model(weight: np.ndarray | None = None) -> onnx.ModelProto:
    """x[batch,4] @ W[4,3] -> Relu -> y: small enough to build by hand, real enough to run."""
    weight = np.arange(12, dtype=np.float32).reshape(4, 3) if weight is None else weight
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def tiny_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), path)
    return path


def test_load_valid_model_infers_shapes(tiny_path: Path) -> None:
    model = load_model(tiny_path)
    inferred = {v.name for v in model.graph.value_info}
    assert "h" in inferred, f"shape inference should annotate the intermediate tensor, got {inferred}"
    info = describe_model(model, tiny_path)
    assert [s.name for s in info.inputs] == ["x"]
    assert info.inputs[0].shape == ("batch", 4)
    assert info.outputs[0].dtype == np.float32
    assert info.num_parameters == 12
    assert info.op_counts == {"MatMul": 1, "Relu": 1}
    assert info.file_bytes == tiny_path.stat().st_size


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"nope\.onnx: no such file"):
        load_model(tmp_path / "nope.onnx")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a folder"):
        load_model(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_model(path)


@pytest.mark.parametrize("content", [b"hello, this is a text file\n", b"\x89PNG\r\n\x1a\n" + bytes(range(200))])
def test_not_onnx(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not an ONNX file"):
        load_model(path)


def test_truncated(tmp_path: Path, tiny_path: Path) -> None:
    data = tiny_path.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(path)


def test_fails_checker(tmp_path: Path) -> None:
    bad = tiny_model()
    bad.graph.node[1].input[0] = "undefined_tensor"  # Relu reads a tensor nothing produces
    path = tmp_path / "bad.onnx"
    onnx.save(bad, path)
    with pytest.raises(ModelLoadError, match=r"fails onnx\.checker"):
        load_model(path)


def test_shape_mismatch_fails_full_check(tmp_path: Path) -> None:
    bad = tiny_model(np.ones((5, 3), np.float32))  # x has 4 features, W expects 5
    path = tmp_path / "mismatch.onnx"
    onnx.save(bad, path)
    with pytest.raises(ModelLoadError, match=r"mismatch\.onnx: fails onnx.checker"):
        load_model(path)


def test_external_data_missing(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save_model(tiny_model(), path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert load_model(path).graph.initializer[0].dims == [4, 3]
    os.remove(tmp_path / "ext.onnx.data")
    with pytest.raises(ModelLoadError, match=r"external data of tensor 'W' is missing"):
        load_model(path)


def test_save_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.onnx"

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model(), target)
    assert list(tmp_path.iterdir()) == [], "a failed save must leave neither the target nor a temp file"


def test_save_replaces_existing_file_and_round_trips(tmp_path: Path) -> None:
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old content")
    save_model(tiny_model(), target)
    assert graph_hash(load_model(target)) == graph_hash(tiny_model())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_large_models_go_to_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend the 2 GB limit is tiny so that the external-data path runs on a small model.
    monkeypatch.setattr(model_io, "_EXTERNAL_DATA_THRESHOLD", 10)
    weight = np.random.default_rng(0).standard_normal((4, 300)).astype(np.float32)
    target = save_model(tiny_model(weight), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    loaded = load_model(target)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weight)
    on_disk = target.stat().st_size + (tmp_path / "big.onnx.data").stat().st_size
    assert describe_model(loaded, target).file_bytes == on_disk


def test_graph_hash_tracks_weights_not_annotations() -> None:
    base = tiny_model()
    assert graph_hash(base) == graph_hash(onnx.shape_inference.infer_shapes(base))
    assert graph_hash(base) != graph_hash(tiny_model(np.ones((4, 3), np.float32)))
