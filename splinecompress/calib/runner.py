"""onnxruntime sessions: which execution provider really runs, and a model with inner tensors exposed.

onnxruntime only returns graph outputs, so the calibration session runs a copy of the model whose probe tensors
(and the tensors its sinks read) are appended to ``graph.output``. Graph optimizations are off in that session:
fusions such as Conv+Relu would otherwise hide the very tensors we read.

Provider choice (DESIGN.md): CUDA when onnxruntime offers it *and* a session actually starts on it, CPU otherwise.
onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU and silently falls back to CPU, so the
provider is read back from the created session, never assumed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from splinecompress.calib.data import Batch, CalibrationData
from splinecompress.errors import UsageError
from splinecompress.progress import progress

__all__ = ["DEVICES", "Session", "create_session", "expose_tensors", "run_with_tensors"]

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class Session:
    """An onnxruntime session and the execution provider it really runs on ("cuda" or "cpu")."""

    session: ort.InferenceSession
    provider: str

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        return self.session.run(None if outputs is None else list(outputs), feeds)


def create_session(
    model: onnx.ModelProto | str,
    *,
    device: str = "auto",
    optimize: bool = True,
    threads: int | None = None,
) -> Session:
    """Create an onnxruntime session on the best provider allowed by ``device``.

    Args:
        model: a ModelProto or a path.
        device: "auto" (CUDA if it starts, else CPU), "cpu", or "cuda" (CPU fallback is an error).
        optimize: all graph optimizations (latency) or none (calibration: keeps every tensor as in the graph).
        threads: intra-op threads (None: onnxruntime's default).

    Raises:
        UsageError: unknown device, or device="cuda" and no CUDA session could be started.
    """
    if device not in DEVICES:
        raise UsageError(f"device '{device}' is not one of {', '.join(DEVICES)}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    offered = ort.get_available_providers()
    if device in ("auto", "cuda") and _CUDA in offered:
        try:
            session = ort.InferenceSession(payload, options, providers=[_CUDA, _CPU])
        except Exception as e:  # onnxruntime raises RuntimeError/Fail variants when CUDA libraries are missing
            if device == "cuda":
                raise UsageError(f"device cuda: onnxruntime could not start CUDAExecutionProvider: {e}") from e
            log.info("CUDAExecutionProvider did not start (%s); using CPU", e)
        else:
            if session.get_providers()[0] == _CUDA:
                return Session(session, "cuda")
            if device == "cuda":
                raise UsageError("device cuda: onnxruntime fell back to CPU (no usable GPU or CUDA libraries)")
            log.info("CUDAExecutionProvider is listed but did not start; using CPU")
    elif device == "cuda":
        raise UsageError(
            "device cuda: this onnxruntime offers no CUDAExecutionProvider (install onnxruntime-gpu: see README)"
        )
    return Session(ort.InferenceSession(payload, options, providers=[_CPU]), "cpu")


def expose_tensors(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the named inner tensors appended to the graph outputs (types from value_info).

    Raises:
        UsageError: a name is not a tensor of the graph.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    known = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    produced = {out for node in graph.node for out in node.output} | {v.name for v in graph.input}
    existing = {v.name for v in graph.output}
    for name in dict.fromkeys(names):
        if name in existing:
            continue
        if name not in produced:
            raise UsageError(f"tensor '{name}' is not produced by any node of the graph")
        value = onnx.ValueInfoProto()
        if name in known:
            value.CopyFrom(known[name])
        else:
            value.name = name
        graph.output.append(value)
        existing.add(name)
    return copy


def run_with_tensors(
    model: onnx.ModelProto,
    data: CalibrationData,
    tensors: Sequence[str],
    *,
    device: str = "auto",
    label: str = "calibrate",
    show_progress: bool | None = None,
) -> tuple[str, Iterator[tuple[Batch, dict[str, np.ndarray]]]]:
    """Run ``data`` through ``model`` (optimizations off) and yield each batch with the named tensors.

    Rows beyond ``batch.valid`` (padding of a fixed-batch model's last batch) are cut off the tensors.

    Returns:
        (the provider that runs, an iterator of (batch, {tensor name: array})).
    """
    tensors = list(dict.fromkeys(tensors))
    session = create_session(expose_tensors(model, tensors), device=device, optimize=False)

    def batches() -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
        for batch in progress(data, label, enabled=show_progress):
            values = session.run(batch.feeds, tensors)
            yield batch, {name: value[: batch.valid] for name, value in zip(tensors, values, strict=True)}

    return session.provider, batches()
