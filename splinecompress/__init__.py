"""splinecompress: prune ONNX models by the spline codes of their piecewise-linear units.

The stages, in order (see DESIGN.md): export -> model I/O -> graph analysis -> calibration -> criteria -> plan
-> surgery -> repair -> validate -> report. Heavy stages (torch) are imported lazily.
"""

from splinecompress.calib.calibrate import calibrate
from splinecompress.calib.stats import SplineStats
from splinecompress.compress import CompressResult, compress
from splinecompress.criteria import CRITERIA, CriterionInput, Scores, score
from splinecompress.errors import (
    CalibrationDataError,
    ExportError,
    ModelLoadError,
    PlanError,
    SplineCompressError,
    UnsupportedGraphError,
    UsageError,
)
from splinecompress.graph.equivalence import check_equivalence, masked_original

# The stages, re-exported after the basics they import (torch-based modules stay lazy: export, finetune,
# earlybird are imported from their modules).
from splinecompress.graph.groups import Group, Groups, analyze_groups
from splinecompress.graph.plan import PruningPlan
from splinecompress.graph.surgery import apply_plan
from splinecompress.model import ModelInfo, TensorSpec, describe_model, load_model, save_model
from splinecompress.policy import make_plan
from splinecompress.repair import repair_model
from splinecompress.validate import ValidationReport, validate

__version__ = "0.1.0"

__all__ = [
    # errors
    "CalibrationDataError",
    "ExportError",
    "ModelLoadError",
    "PlanError",
    "SplineCompressError",
    "UnsupportedGraphError",
    "UsageError",
    # model I/O
    "ModelInfo",
    "TensorSpec",
    "describe_model",
    "load_model",
    "save_model",
    # stages, in pipeline order
    "Group",
    "Groups",
    "analyze_groups",
    "SplineStats",
    "calibrate",
    "CRITERIA",
    "CriterionInput",
    "Scores",
    "score",
    "PruningPlan",
    "make_plan",
    "repair_model",
    "apply_plan",
    "check_equivalence",
    "masked_original",
    "ValidationReport",
    "validate",
    "CompressResult",
    "compress",
    "__version__",
]
