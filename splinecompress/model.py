"""Reading, checking and writing ONNX files: the one place that turns bytes into a ModelProto and back.

Loading checks everything a later stage would otherwise trip over with an obscure message: the file exists, is
ONNX, is complete, has its external data, and passes the full onnx.checker (with shape inference). Saving is
atomic: the model is written to a temporary file in the target folder and renamed over the target, so a crash or
an error never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper

from splinecompress._io import atomic_path
from splinecompress.errors import ModelLoadError

__all__ = [
    "ModelInfo",
    "TensorSpec",
    "check_model",
    "describe_model",
    "file_bytes",
    "graph_hash",
    "infer_shapes",
    "input_specs",
    "load_model",
    "output_specs",
    "save_model",
]

# protobuf refuses to serialise a message over 2 GiB; leave headroom for the graph itself.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000

# A serialised ModelProto starts with field 1 (ir_version, varint): tag byte 0x08. Files that start with it but
# fail to parse are damaged ONNX files rather than some other kind of file.
_ONNX_FIRST_BYTE = 0x08

Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of a graph input or output.

    ``shape`` holds an int for a fixed dimension, a string for a named symbolic one (``"batch"``) and None for
    an unnamed unknown one; ``shape`` itself is None when the rank is unknown.
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None

    def shape_text(self) -> str:
        if self.shape is None:
            return "?"
        return "x".join("?" if d is None else str(d) for d in self.shape)


@dataclass(frozen=True)
class ModelInfo:
    """What a user wants to know about a model before touching it."""

    path: str | None
    file_bytes: int | None
    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    op_counts: dict[str, int]
    num_parameters: int
    num_initializers: int


def load_model(path: str | os.PathLike[str], *, check: bool = True, infer: bool = True) -> onnx.ModelProto:
    """Load an ONNX file with its external data, check it and infer shapes.

    Args:
        path: the .onnx file. External data files are looked up next to it.
        check: run the full onnx.checker (structure, types and strict shape inference).
        infer: return the model with inferred shapes in ``graph.value_info``.

    Returns:
        The loaded model.

    Raises:
        ModelLoadError: the file is missing, empty, not ONNX, truncated, lacks external data, or fails the
            checker. The message names the file and the fault.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, expected an .onnx file")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path}: the file is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as e:
        with open(path, "rb") as f:
            first = f.read(1)
        if first and first[0] == _ONNX_FIRST_BYTE:
            raise ModelLoadError(f"{path}: truncated or corrupt ONNX file ({size} bytes cannot be parsed)") from e
        raise ModelLoadError(f"{path}: not an ONNX file (cannot be parsed as an ONNX model)") from e
    if model.ir_version == 0 or not model.HasField("graph"):
        raise ModelLoadError(f"{path}: not an ONNX file (no IR version or no graph in it)")
    _load_external_data(model, path)
    if check:
        check_model(model, name=str(path))
    if infer:
        model = infer_shapes(model, name=str(path))
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    external = [t for t in _all_tensors(model) if uses_external_data(t)]
    if not external:
        return
    base = path.parent
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location is None or not (base / location).is_file():
            raise ModelLoadError(
                f"{path}: external data of tensor '{tensor.name}' is missing: expected file "
                f"'{base / (location or '?')}' next to the model"
            )
    try:
        load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise ModelLoadError(f"{path}: cannot read external data: {e}") from e


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
    return tensors


def check_model(model: onnx.ModelProto, *, name: str = "model") -> None:
    """Run the full onnx.checker (with strict shape inference) and raise a one-line error on failure.

    Raises:
        ModelLoadError: the model is not valid ONNX; the message names ``name`` and the checker's complaint.
    """
    try:
        if model.ByteSize() > _EXTERNAL_DATA_THRESHOLD:
            # The checker cannot take a proto this large in memory; check a copy on disk instead.
            with tempfile.TemporaryDirectory() as tmp:
                tmp_path = os.path.join(tmp, "model.onnx")
                _write(model, tmp_path, external=True)
                onnx.checker.check_model(tmp_path, full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelLoadError(f"{name}: fails onnx.checker: {_first_line(e)}") from e


def infer_shapes(model: onnx.ModelProto, *, name: str = "model") -> onnx.ModelProto:
    """Return a copy of ``model`` with shapes inferred for every tensor onnx can infer.

    Raises:
        ModelLoadError: shape inference finds the graph inconsistent.
    """
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelLoadError(f"{name}: shape inference fails: {_first_line(e)}") from e


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` atomically; models over ~2 GB get a ``<name>.data`` external data file.

    The model goes to a temporary file in the same folder first and is renamed over ``path`` only once it is
    complete, so readers never see a half-written file.

    Returns:
        The path written.
    """
    path = Path(path)
    external = model.ByteSize() > _EXTERNAL_DATA_THRESHOLD
    with atomic_path(path) as tmp:
        if external:
            # External data is written beside the temp file under its final name, then the model is renamed:
            # the .onnx only appears once both are complete.
            _write(model, str(tmp), external=True, location=path.name + ".data")
        else:
            _write(model, str(tmp), external=False)
    return path


def _write(model: onnx.ModelProto, path: str, *, external: bool, location: str | None = None) -> None:
    if external:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(
            copy,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=location or (os.path.basename(path) + ".data"),
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, path)


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param"):
        return d.dim_param
    return None


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)) if tensor_type.elem_type else None
    shape = tuple(_dim(d) for d in tensor_type.shape.dim) if tensor_type.HasField("shape") else None
    return TensorSpec(name=value.name, dtype=dtype, shape=shape)


def input_specs(model: onnx.ModelProto) -> tuple[TensorSpec, ...]:
    """The model's real inputs (initializers listed as inputs by old exporters are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    return tuple(_spec(v) for v in model.graph.input if v.name not in initializers)


def output_specs(model: onnx.ModelProto) -> tuple[TensorSpec, ...]:
    return tuple(_spec(v) for v in model.graph.output)


def describe_model(model: onnx.ModelProto, path: str | os.PathLike[str] | None = None) -> ModelInfo:
    """Summarise a model: inputs, outputs, opsets, op counts, parameters and file size."""
    op_counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        op_counts[key] = op_counts.get(key, 0) + 1
    num_parameters = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return ModelInfo(
        path=None if path is None else str(path),
        file_bytes=None if path is None else file_bytes(path),
        ir_version=model.ir_version,
        opsets={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=input_specs(model),
        outputs=output_specs(model),
        op_counts=dict(sorted(op_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        num_parameters=num_parameters,
        num_initializers=len(model.graph.initializer),
    )


def file_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of an ONNX file plus the external data files it names."""
    path = Path(path)
    # External data references are gone once the data is loaded, so read them from the file itself.
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value for tensor in _all_tensors(model) for entry in tensor.external_data if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def graph_hash(model: onnx.ModelProto) -> str:
    """A short hash of the graph's structure and weights, to tie a plan to the model it was made for.

    Shape annotations (value_info) are left out so that re-running shape inference does not change the hash.
    """
    digest = hashlib.sha256()
    graph = model.graph
    for node in graph.node:
        digest.update(node.SerializeToString(deterministic=True))
    for tensor in sorted(graph.initializer, key=lambda t: t.name):
        digest.update(tensor.name.encode())
        digest.update(np.ascontiguousarray(onnx.numpy_helper.to_array(tensor)).tobytes())
    for value in list(graph.input) + list(graph.output):
        digest.update(value.SerializeToString(deterministic=True))
    return digest.hexdigest()[:16]
