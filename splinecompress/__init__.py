"""splinecompress: prune ONNX models by the spline codes of their piecewise-linear units.

The stages, in order (see DESIGN.md): export -> model I/O -> graph analysis -> calibration -> criteria -> plan
-> surgery -> repair -> validate -> report. Heavy stages (torch) are imported lazily.
"""

from splinecompress.errors import (
    CalibrationDataError,
    ExportError,
    ModelLoadError,
    PlanError,
    SplineCompressError,
    UnsupportedGraphError,
    UsageError,
)
from splinecompress.model import ModelInfo, TensorSpec, describe_model, load_model, save_model

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
    "__version__",
]
