"""Calibration as one call: run the data through the model and reduce it to SplineStats on the fly."""

from __future__ import annotations

from typing import Any

import onnx

from splinecompress.calib.data import CalibrationData
from splinecompress.calib.runner import run_with_tensors
from splinecompress.calib.stats import SplineStats, StatsAccumulator
from splinecompress.errors import CalibrationDataError
from splinecompress.graph.groups import Groups
from splinecompress.model import input_specs

__all__ = ["calibrate"]


def calibrate(
    model: onnx.ModelProto,
    groups: Groups,
    source: Any,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    max_positions: int | None = None,
    seed: int = 0,
    show_progress: bool | None = None,
) -> SplineStats:
    """Spline statistics of every prunable group of ``model`` over a calibration source.

    Args:
        model: the model, as loaded by ``splinecompress.model.load_model`` (shapes inferred).
        groups: its channel groups (``splinecompress.graph.groups.analyze_groups``).
        source: anything ``CalibrationData`` accepts (a .npz path, a folder, a reader, feed dicts), or a
            ``CalibrationData`` already bound to the model.
        batch_size: rows per onnxruntime run (ignored when the model's batch is fixed).
        device: "auto", "cpu" or "cuda" (see ``runner.create_session``).
        max_positions: subsample at most this many positions per probe tensor per batch (seeded).

    Raises:
        CalibrationDataError: the data is empty or does not fit the model's inputs.
    """
    data = (
        source
        if isinstance(source, CalibrationData)
        else CalibrationData(source, input_specs(model), batch_size=batch_size)
    )
    accumulator = StatsAccumulator(groups, max_positions=max_positions, seed=seed)
    if not accumulator.groups:
        raise CalibrationDataError("the model has no prunable group with a probe tensor: nothing to calibrate")
    provider, batches = run_with_tensors(model, data, accumulator.tensors(), device=device, show_progress=show_progress)
    for batch, values in batches:
        accumulator.update(values, batch.valid)
    return accumulator.finalize(provider)
