"""One exception family for everything splinecompress reports to a user.

Every message names the file, tensor or op at fault and, where it can, what to do about it. The CLI prints
the message of a :class:`SplineCompressError` as one line and exits with status 2; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "CalibrationDataError",
    "ExportError",
    "ModelLoadError",
    "PlanError",
    "SplineCompressError",
    "UnsupportedGraphError",
    "UsageError",
    "VerificationError",
]


class SplineCompressError(Exception):
    """Base of every error splinecompress raises for bad input or a failed check."""


class UsageError(SplineCompressError):
    """An argument is out of range or two arguments contradict each other."""


class ModelLoadError(SplineCompressError):
    """An ONNX file cannot be read, is truncated, is not ONNX, or fails onnx.checker."""


class ExportError(SplineCompressError):
    """A PyTorch module could not be exported, or the exported ONNX model disagrees with it."""


class UnsupportedGraphError(SplineCompressError):
    """The graph holds something an operation needs to understand and does not."""


class PlanError(SplineCompressError):
    """A pruning plan does not fit the model it is applied to."""


class CalibrationDataError(SplineCompressError):
    """Calibration or validation data is missing, empty, or does not match the model's inputs."""


class VerificationError(SplineCompressError):
    """A result failed its own check (the slim model differs from the masked original): exit status 1."""
