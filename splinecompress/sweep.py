"""Accuracy against FLOPs kept over a sweep of ratios, so users can pick a ratio by looking.

The expensive parts (groups, spline statistics, second moments of every sink) do not depend on the plan and are
computed once (:func:`prepare`); each point of the sweep is then a plan, a repair, a surgery and one pass over
the validation data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from splinecompress.calib.calibrate import calibrate
from splinecompress.calib.data import CalibrationData
from splinecompress.calib.moments import SinkMoments, collect_moments
from splinecompress.calib.runner import create_session
from splinecompress.calib.stats import SplineStats
from splinecompress.criteria import DATA_CRITERIA, CriterionInput, score
from splinecompress.graph.groups import Groups, analyze_groups
from splinecompress.graph.surgery import apply_plan
from splinecompress.model import input_specs, load_model
from splinecompress.policy import make_plan
from splinecompress.repair import repair_model, sink_patches

__all__ = ["Prepared", "SweepPoint", "prepare", "sweep"]


@dataclass(frozen=True)
class Prepared:
    """A model with everything plans and repairs need, computed once."""

    model: onnx.ModelProto
    groups: Groups
    stats: SplineStats
    moments: dict[str, SinkMoments]


@dataclass(frozen=True)
class SweepPoint:
    """One pruned model of a sweep and how it did (accuracy None without labels)."""

    criterion: str
    scope: str
    ratio: float
    repair: str
    seed: int
    flops_kept: float
    params_kept: float
    accuracy: float | None
    agreement: float


def prepare(
    model_path: str | os.PathLike[str], calib: Any, *, device: str = "auto", show_progress: bool | None = None
) -> Prepared:
    """Load, analyse and calibrate a model, with second moments of every prunable group's sinks."""
    model = load_model(model_path)
    groups = analyze_groups(model)
    stats = calibrate(model, groups, calib, device=device, show_progress=show_progress)
    sinks = (m.node for group in groups.prunable() for m in group.members if m.role == "sink")
    patches, _ = sink_patches(model, sinks)  # sinks least squares cannot handle fall back to bias repair
    moments = collect_moments(model, patches, calib, device=device, show_progress=show_progress)
    return Prepared(model, groups, stats, moments)


def sweep(
    prepared: Prepared,
    val: Any,
    ratios: Sequence[float],
    *,
    criterion: str = "spline",
    scope: str = "layer",
    repair: str = "lstsq",
    round_to: int = 1,
    seed: int = 0,
) -> list[SweepPoint]:
    """Prune at every ratio, repair, and measure top-1 (with labels) and agreement with the original on ``val``."""
    model, groups, stats = prepared.model, prepared.groups, prepared.stats
    scores = score(criterion, CriterionInput(model, groups, stats, seed=seed))
    reference = _outputs(model, val)
    points = []
    for ratio in ratios:
        outcome = make_plan(
            model,
            groups,
            scores,
            ratio=ratio,
            scope=scope,
            round_to=round_to,
            drop_dead=criterion in DATA_CRITERIA,
            stats=stats,
        )
        repaired = repair_model(model, groups, outcome.plan, method=repair, stats=stats, moments=prepared.moments)
        surgery = apply_plan(repaired.model, repaired.plan)
        predictions = _outputs(surgery.model, val)
        labels = reference["labels"]
        points.append(
            SweepPoint(
                criterion=criterion,
                scope=scope,
                ratio=ratio,
                repair=repair,
                seed=seed,
                flops_kept=surgery.macs_after / surgery.macs_before,
                params_kept=surgery.params_after / surgery.params_before,
                accuracy=None if labels is None else float(np.mean(predictions["top1"] == labels)),
                agreement=float(np.mean(predictions["top1"] == reference["top1"])),
            )
        )
    return points


def _outputs(model: onnx.ModelProto, val: Any) -> dict[str, np.ndarray | None]:
    """Top-1 of the first output over the whole data set (and the labels, if any)."""
    session = create_session(model, device="cpu")
    top1, labels = [], []
    for batch in CalibrationData(val, input_specs(model), role="validation"):
        top1.append(session.run(batch.feeds)[0][: batch.valid].argmax(axis=1))
        if batch.labels is not None:
            labels.append(batch.labels)
    return {"top1": np.concatenate(top1), "labels": np.concatenate(labels) if labels else None}
