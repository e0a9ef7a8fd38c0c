"""Validation: how a (slim) model compares with its reference on real data, and how fast each one runs.

One pass over the data runs both models batch by batch and keeps only running counts and sums (correct top-1,
agreeing top-1, sum and max of absolute output differences), so memory does not grow with the data set. Latency
is measured afterwards on the first ``latency_batch`` real samples, with graph optimizations on and fixed threads
(DESIGN.md, "The rules that keep results honest"); the two models' timed runs are interleaved, alternating which
goes first, so that noise from other processes on the machine hits both alike.

Example::

    report = validate("slim.onnx", "val.npz", reference="model.onnx")
    report.model.accuracy, report.reference.accuracy, report.agreement
    json.dumps(report.to_dict())
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splinecompress.calib.data import Batch, CalibrationData
from splinecompress.calib.runner import Session, create_session
from splinecompress.errors import CalibrationDataError, UsageError
from splinecompress.graph.cost import model_cost
from splinecompress.model import TensorSpec, file_bytes, input_specs, load_model

if TYPE_CHECKING:
    import onnx

__all__ = [
    "DEFAULT_REPEATS",
    "DEFAULT_WARMUP",
    "ModelMeasurement",
    "ValidationReport",
    "validate",
]

log = logging.getLogger(__name__)

DEFAULT_WARMUP = 10
DEFAULT_REPEATS = 50


@dataclass(frozen=True)
class ModelMeasurement:
    """What was measured for one model.

    Attributes:
        path: the ONNX file.
        params: parameters (every distinct constant tensor counted once).
        flops: multiply-accumulates of one sample (a symbolic batch counted as 1), or None when some node's
            cost could not be computed (a non-batch dimension is unknown).
        file_bytes: bytes on disk, external data included.
        latency_ms_median: median wall time of one run on ``latency_batch`` samples, in ms (None: not measured).
        latency_ms_p90: 90th percentile of the same runs, in ms.
        accuracy: top-1 accuracy of the first output against the labels (None: the data has no labels).
    """

    path: str
    params: int
    flops: int | None
    file_bytes: int
    latency_ms_median: float | None
    latency_ms_p90: float | None
    accuracy: float | None


@dataclass(frozen=True)
class ValidationReport:
    """A model measured on a data set, side by side with its reference (the original) if one was given.

    Attributes:
        model: the model validated (usually the slim one).
        reference: the reference model (usually the original), or None.
        agreement: fraction of top-1 predictions (argmax over axis 1 of the first output, at every position for
            outputs of rank > 2) that the model shares with the reference; None without a reference.
        max_abs_diff: largest absolute difference between the two models' outputs, over all outputs.
        mean_abs_diff: mean absolute difference over every element of every output.
        samples: real samples evaluated (padding rows of fixed-batch models excluded).
        provider: execution provider both models ran on ("cpu" or "cuda").
        threads: intra-op threads of both sessions (None: onnxruntime's default).
        batch_size: rows per run in the accuracy pass.
        latency_batch: rows per timed run.
        warmup: untimed runs per model before timing.
        repeats: timed runs per model (0: latency not measured).
    """

    model: ModelMeasurement
    reference: ModelMeasurement | None
    agreement: float | None
    max_abs_diff: float | None
    mean_abs_diff: float | None
    samples: int
    provider: str
    threads: int | None
    batch_size: int
    latency_batch: int
    warmup: int
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain ints, floats, strings and None)."""
        return asdict(self)


def validate(
    model_path: str | os.PathLike[str],
    data: Any,
    *,
    reference: str | os.PathLike[str] | None = None,
    device: str = "auto",
    threads: int | None = 1,
    batch_size: int | None = None,
    latency_batch: int = 1,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    measure_latency: bool = True,
) -> ValidationReport:
    """Measure accuracy, agreement with a reference, output differences, latency and size of an ONNX model.

    Args:
        model_path: the model to validate (the slim one).
        data: validation data in any form calibration accepts (``.npz`` path, folder, reader, iterable of feed
            dicts); an optional ``labels`` array gives accuracy.
        reference: the model to compare with (the original); it must take the same inputs and give as many
            outputs. Outputs are paired by position.
        device: "auto", "cpu" or "cuda" (see ``create_session``); the reference runs on the provider the model got.
        threads: intra-op threads of both sessions; fixed so latencies are comparable (None: onnxruntime default).
        batch_size: rows per run in the accuracy pass (default 32; a fixed batch dimension overrides it).
        latency_batch: rows per timed run, taken from the first real samples of ``data`` (repeated if the data is
            smaller); a fixed batch dimension overrides it.
        warmup: untimed runs per model before timing.
        repeats: timed runs per model.
        measure_latency: False skips the benchmark (latency fields are None).

    Returns:
        The ValidationReport.

    Raises:
        ModelLoadError: a model file cannot be read or fails the checker.
        CalibrationDataError: the data is missing, empty or does not fit the model's inputs; labels out of range.
        UsageError: bad argument values; the reference takes different inputs or gives a different number of
            outputs or output shapes; labels given but the first output is not [batch, classes] scores.
    """
    if latency_batch < 1:
        raise UsageError(f"latency batch {latency_batch} must be at least 1")
    if measure_latency and (warmup < 0 or repeats < 1):
        raise UsageError(f"latency needs warmup >= 0 and repeats >= 1 (got warmup {warmup}, repeats {repeats})")
    if threads is not None and threads < 1:
        raise UsageError(f"threads {threads} must be at least 1")

    model = load_model(model_path)
    specs = input_specs(model)
    ref_model = None
    if reference is not None:
        ref_model = load_model(reference)
        ref_specs = input_specs(ref_model)
        _check_same_inputs(specs, ref_specs, model_path, reference)
        specs = _batch_from(specs, ref_specs)
        if len(ref_model.graph.output) != len(model.graph.output):
            raise UsageError(
                f"reference {reference} has {len(ref_model.graph.output)} output(s), {model_path} has "
                f"{len(model.graph.output)}: outputs are compared by position, so the counts must match"
            )

    session = create_session(str(model_path), device=device, threads=threads)
    # Same provider for both, or the latency comparison would be meaningless.
    ref_session = (
        None if reference is None else create_session(str(reference), device=session.provider, threads=threads)
    )

    dataset = CalibrationData(data, specs, batch_size=batch_size, role="validation")
    wanted = _fixed_batch(specs) or latency_batch
    if wanted != latency_batch:
        log.info("the model's batch dimension is fixed at %d: latency batch %d is ignored", wanted, latency_batch)
    tally = _Tally(has_reference=ref_session is not None)
    names = _output_names(session)
    latency_rows: list[dict[str, np.ndarray]] = []
    held = 0
    for batch in dataset:
        outputs = session.run(batch.feeds)
        ref_outputs = None if ref_session is None else ref_session.run(batch.feeds)
        tally.add(batch, outputs, ref_outputs, names=names, ref=reference)
        if held < wanted:
            # Copies: batches may be views of the whole source array.
            latency_rows.append({k: np.array(v[: batch.valid][: wanted - held]) for k, v in batch.feeds.items()})
            held += min(batch.valid, wanted - held)

    model_latency: tuple[float, float] | None = None
    ref_latency: tuple[float, float] | None = None
    if measure_latency:
        feeds = _latency_feeds(latency_rows, wanted)
        sessions = [session] if ref_session is None else [session, ref_session]
        timings = _interleaved_latency(sessions, feeds, warmup=warmup, repeats=repeats)
        model_latency = timings[0]
        ref_latency = timings[1] if ref_session is not None else None

    measured = _measure(model, model_path, model_latency, tally.accuracy())
    ref_measured = None
    if ref_model is not None and reference is not None:
        ref_measured = _measure(ref_model, reference, ref_latency, tally.accuracy(reference=True))
    return ValidationReport(
        model=measured,
        reference=ref_measured,
        agreement=tally.agreement(),
        max_abs_diff=tally.max_abs_diff(),
        mean_abs_diff=tally.mean_abs_diff(),
        samples=tally.samples,
        provider=session.provider,
        threads=threads,
        batch_size=dataset.batch_size,
        latency_batch=wanted,
        warmup=warmup if measure_latency else 0,
        repeats=repeats if measure_latency else 0,
    )


# -- the accuracy pass ----------------------------------------------------------------------------------------


class _Tally:
    """Running counts and sums over batches: nothing per sample is kept."""

    def __init__(self, *, has_reference: bool) -> None:
        self.has_reference = has_reference
        self.samples = 0
        self.labelled = 0
        self.correct = 0
        self.ref_correct = 0
        self.positions = 0
        self.agreeing = 0
        self.abs_sum = 0.0
        self.elements = 0
        self.abs_max = 0.0

    def add(
        self,
        batch: Batch,
        outputs: Sequence[np.ndarray],
        ref_outputs: Sequence[np.ndarray] | None,
        *,
        names: Sequence[str],
        ref: str | os.PathLike[str] | None,
    ) -> None:
        n = batch.valid
        self.samples += n
        outputs = [np.asarray(o)[:n] for o in outputs]
        if ref_outputs is not None:
            ref_outputs = [np.asarray(o)[:n] for o in ref_outputs]
        if ref_outputs is not None:
            # Shapes first: every comparison below assumes paired outputs line up.
            for name, out, ref_out in zip(names, outputs, ref_outputs, strict=True):
                if out.shape != ref_out.shape:
                    raise UsageError(
                        f"output '{name}' has shape {out.shape} but the reference {ref}'s output in that position "
                        f"has {ref_out.shape}: the models do not compute the same thing"
                    )
        first = outputs[0]
        if batch.labels is not None:
            scores = _class_scores(first, names[0])
            self._check_labels(batch.labels, scores.shape[1])
            self.labelled += n
            self.correct += int(np.count_nonzero(scores.argmax(axis=1) == batch.labels))
            if ref_outputs is not None:
                self.ref_correct += int(np.count_nonzero(ref_outputs[0].argmax(axis=1) == batch.labels))
        if ref_outputs is None:
            return
        for out, ref_out in zip(outputs, ref_outputs, strict=True):
            # float64: a float32 running sum over millions of elements would lose the small differences.
            diff = np.abs(out.astype(np.float64) - ref_out.astype(np.float64))
            if diff.size:
                self.abs_max = max(self.abs_max, float(diff.max()))
                self.abs_sum += float(diff.sum())
                self.elements += diff.size
        if first.ndim >= 2:
            same = first.argmax(axis=1) == ref_outputs[0].argmax(axis=1)
            self.positions += same.size
            self.agreeing += int(np.count_nonzero(same))

    @staticmethod
    def _check_labels(labels: np.ndarray, classes: int) -> None:
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise CalibrationDataError(
                f"validation data: labels range {labels.min()}..{labels.max()}, but the model scores {classes} "
                f"classes (labels must be class indices 0..{classes - 1})"
            )

    def accuracy(self, *, reference: bool = False) -> float | None:
        if not self.labelled:
            return None
        return (self.ref_correct if reference else self.correct) / self.labelled

    def agreement(self) -> float | None:
        return self.agreeing / self.positions if self.has_reference and self.positions else None

    def max_abs_diff(self) -> float | None:
        return self.abs_max if self.has_reference and self.elements else None

    def mean_abs_diff(self) -> float | None:
        return self.abs_sum / self.elements if self.has_reference and self.elements else None


def _class_scores(output: np.ndarray, name: str) -> np.ndarray:
    if output.ndim != 2:
        raise UsageError(
            f"the data has labels, but the first output '{name}' has shape {output.shape}: top-1 accuracy needs "
            "[batch, classes] scores (drop the labels to compare outputs only)"
        )
    return output


def _output_names(session: Session) -> list[str]:
    return [o.name for o in session.session.get_outputs()]


def _fixed_batch(specs: Sequence[TensorSpec]) -> int | None:
    for spec in specs:
        if spec.shape and isinstance(spec.shape[0], int):
            return spec.shape[0]
    return None


def _batch_from(specs: Sequence[TensorSpec], ref_specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The model's input specs, with the reference's batch dimension where only the reference fixes it.

    Batches must fit both models: a dynamic-batch slim model compared with a fixed-batch original gets the
    original's batch size (and its padding of the last batch).
    """
    ref_by_name = {s.name: s for s in ref_specs}
    merged = []
    for spec in specs:
        ref = ref_by_name[spec.name]
        if spec.shape and ref.shape and not isinstance(spec.shape[0], int) and isinstance(ref.shape[0], int):
            spec = TensorSpec(spec.name, spec.dtype, (ref.shape[0], *spec.shape[1:]))
        merged.append(spec)
    return merged


def _check_same_inputs(
    specs: Sequence[TensorSpec],
    ref_specs: Sequence[TensorSpec],
    model_path: str | os.PathLike[str],
    reference: str | os.PathLike[str],
) -> None:
    """The reference must accept the very feeds the model gets: same names, dtypes, ranks and fixed dimensions."""
    names = sorted(s.name for s in specs)
    ref_names = sorted(s.name for s in ref_specs)
    if names != ref_names:
        raise UsageError(
            f"reference {reference} takes input(s) {ref_names}, {model_path} takes {names}: both models must "
            "have the same input names"
        )
    by_name = {s.name: s for s in ref_specs}
    for spec in specs:
        ref = by_name[spec.name]
        if spec.dtype != ref.dtype:
            raise UsageError(
                f"input '{spec.name}' is {spec.dtype} in {model_path} but {ref.dtype} in reference {reference}"
            )
        if spec.shape is None or ref.shape is None:
            continue
        clash = len(spec.shape) != len(ref.shape) or any(
            isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(spec.shape, ref.shape, strict=False)
        )
        if clash:
            raise UsageError(
                f"input '{spec.name}' is {spec.shape_text()} in {model_path} but {ref.shape_text()} in reference "
                f"{reference}: both models must accept the same data"
            )


# -- latency --------------------------------------------------------------------------------------------------


def _latency_feeds(rows: list[dict[str, np.ndarray]], wanted: int) -> dict[str, np.ndarray]:
    feeds = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    have = len(next(iter(feeds.values())))
    if have < wanted:
        log.info("latency batch %d is larger than the data (%d samples): samples are repeated", wanted, have)
        # np.resize repeats the samples cyclically along the batch axis.
        feeds = {k: np.resize(v, (wanted, *v.shape[1:])) for k, v in feeds.items()}
    return feeds


def _interleaved_latency(
    sessions: Sequence[Session], feeds: dict[str, np.ndarray], *, warmup: int, repeats: int
) -> list[tuple[float, float]]:
    """(median ms, p90 ms) per session; timed runs alternate between sessions, and so does who goes first."""
    for _ in range(warmup):
        for s in sessions:
            s.run(feeds)
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for r in range(repeats):
        # Alternate the order so that neither model always runs right after the other (cache, clock effects).
        for i in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter_ns()
            sessions[i].run(feeds)
            times[i].append((time.perf_counter_ns() - start) / 1e6)
    return [(float(np.median(t)), float(np.percentile(t, 90))) for t in times]


# -- size -----------------------------------------------------------------------------------------------------


def _measure(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    latency: tuple[float, float] | None,
    accuracy: float | None,
) -> ModelMeasurement:
    cost = model_cost(model)
    flops: int | None = cost.macs
    if not cost.complete:
        log.warning("%s: some nodes have unknown shapes, FLOPs are not reported", path)
        flops = None
    return ModelMeasurement(
        path=str(Path(path)),
        params=cost.params,
        flops=flops,
        file_bytes=file_bytes(path),
        latency_ms_median=None if latency is None else latency[0],
        latency_ms_p90=None if latency is None else latency[1],
        accuracy=accuracy,
    )
