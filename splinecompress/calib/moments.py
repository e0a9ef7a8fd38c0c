"""Second moments of what a sink reads, for least-squares repair.

A sink (Conv, Gemm, MatMul) computes ``y = W x + b`` where ``x`` is one input *patch*: for a k x k Conv the
C*k*k values under the kernel at one output position (with the conv's stride, dilation and zero padding), for a
Gemm/MatMul one row of features. Least-squares repair needs E[x~ x~^T] with x~ = [x; 1]. This module streams
that matrix over calibration batches, sampling at most ``max_positions`` output positions per batch (seeded):
a k x k conv over a large feature map has far more patches than the estimate needs.

Memory is one (F+1)^2 float64 matrix per sink, F = C*k*k (4609^2 * 8 B = 170 MB for a 3x3 conv over 512
channels); only the sinks a plan touches are collected.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from splinecompress.calib.data import CalibrationData
from splinecompress.calib.runner import run_with_tensors
from splinecompress.errors import UnsupportedGraphError
from splinecompress.model import input_specs

__all__ = ["SinkMoments", "SinkPatch", "collect_moments", "sink_patch"]

DEFAULT_MAX_POSITIONS = 1024


@dataclass(frozen=True)
class SinkPatch:
    """How to cut patches out of a sink's input: the tensor, and the conv geometry (1x1 for Gemm/MatMul)."""

    node: str
    tensor: str
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    spatial: bool = False  # NCHW conv input, or a [rows, features] matrix


@dataclass
class SinkMoments:
    """E[x~ x~^T] accumulated as a sum: ``sums`` is (F+1)x(F+1), the last coordinate the constant 1."""

    patch: SinkPatch
    count: int
    sums: np.ndarray

    def second_moment(self) -> np.ndarray:
        return self.sums / max(self.count, 1)


def sink_patch(node: onnx.NodeProto, weight_shape: tuple[int, ...] | None = None) -> SinkPatch:
    """The patch geometry of a Conv (group 1, 2-D), Gemm (transA 0) or MatMul (2-D input) sink.

    ``kernel_shape`` is optional in ONNX; without it the kernel is read off ``weight_shape``.

    Raises:
        UnsupportedGraphError: any other op or configuration.
    """
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        kernel = attrs.get("kernel_shape") or (tuple(weight_shape[2:]) if weight_shape else None)
        if attrs.get("group", 1) != 1 or kernel is None or len(kernel) != 2:
            raise UnsupportedGraphError(f"least-squares repair supports 2-D ungrouped Conv only ({node.name})")
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise UnsupportedGraphError(f"least-squares repair does not support auto_pad ({node.name})")
        pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
        return SinkPatch(
            node.name,
            node.input[0],
            tuple(kernel),
            tuple(attrs.get("strides", (1, 1))),
            tuple(attrs.get("dilations", (1, 1))),
            (pads[0], pads[1], pads[2], pads[3]),
            spatial=True,
        )
    if node.op_type == "Gemm" and not attrs.get("transA", 0):
        return SinkPatch(node.name, node.input[0])
    if node.op_type == "MatMul":
        return SinkPatch(node.name, node.input[0])
    raise UnsupportedGraphError(f"least-squares repair does not support {node.op_type} sinks ({node.name})")


def patches(value: np.ndarray, patch: SinkPatch, rng: np.random.Generator, max_positions: int) -> np.ndarray:
    """[positions, F] patches of one batch (features ordered channel, kernel row, kernel column)."""
    if not patch.spatial:
        rows = value.reshape(-1, value.shape[-1])
        if len(rows) > max_positions:
            rows = rows[np.sort(rng.choice(len(rows), max_positions, replace=False))]
        return rows
    n, c, h, w = value.shape
    kh, kw = patch.kernel
    sh, sw = patch.strides
    dh, dw = patch.dilations
    top, left, bottom, right = patch.pads
    out_h = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    total = n * out_h * out_w
    picked = np.arange(total) if total <= max_positions else np.sort(rng.choice(total, max_positions, replace=False))
    sample, rest = np.divmod(picked, out_h * out_w)
    oh, ow = np.divmod(rest, out_w)
    padded = np.pad(value, ((0, 0), (0, 0), (top, bottom), (left, right)))
    rows = oh[:, None] * sh + np.arange(kh)[None, :] * dh  # [P, kh]
    cols = ow[:, None] * sw + np.arange(kw)[None, :] * dw  # [P, kw]
    # [P, C, kh, kw] gathered in one fancy-indexing step.
    gathered = padded[
        sample[:, None, None, None], np.arange(c)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]
    ]
    return gathered.reshape(len(picked), c * kh * kw)


def collect_moments(
    model: onnx.ModelProto,
    sinks: Iterable[SinkPatch],
    source: object,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    max_positions: int = DEFAULT_MAX_POSITIONS,
    seed: int = 0,
    show_progress: bool | None = None,
) -> dict[str, SinkMoments]:
    """Stream E[x~ x~^T] of every given sink's patches over a calibration source.

    Returns:
        Sink node name -> its moments.
    """
    sinks = list(sinks)
    if not sinks:
        return {}
    data = (
        source
        if isinstance(source, CalibrationData)
        else CalibrationData(source, input_specs(model), batch_size=batch_size)
    )
    rng = np.random.default_rng(seed)
    moments: dict[str, SinkMoments] = {}
    _, batches = run_with_tensors(
        model, data, [s.tensor for s in sinks], device=device, label="repair statistics", show_progress=show_progress
    )
    for _, values in batches:
        for sink in sinks:
            x = patches(values[sink.tensor], sink, rng, max_positions).astype(np.float32)
            x = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
            # float32 BLAS for the batch (fast), float64 for the running sum (no drift over many batches).
            product = (x.T @ x).astype(np.float64)
            entry = moments.get(sink.node)
            if entry is None:
                moments[sink.node] = SinkMoments(sink, len(x), product)
            else:
                entry.count += len(x)
                entry.sums += product
    return moments
