"""PyTorch -> ONNX, with a numeric parity check that fails the export when ONNX and torch disagree.

Two exporters are supported and ``dynamo=`` is always passed explicitly to ``torch.onnx.export``:

- the TorchScript-based exporter (``dynamo=False``, the default here): it honours the requested opset, needs no
  extra package, is several times faster on large models, and keeps BatchNormalization nodes on request
  (``TrainingMode.PRESERVE``, no constant folding). torch marks it deprecated, so it warns; the warning is
  silenced here because the choice is deliberate and tested.
- the dynamo-based exporter (``dynamo=True``): the future of torch.onnx, needs onnxscript, emits opset 18 whatever
  is asked, and traces more Python. Use it for models the legacy tracer cannot handle.

BatchNorm is folded into the preceding Conv by both exporters in eval mode (what a deployed model wants);
``keep_batchnorm=True`` keeps BatchNormalization nodes, which the BN-scale criterion needs.

torch is imported lazily: the rest of splinecompress works without it.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from splinecompress._optional import require_torch
from splinecompress.errors import ExportError, UsageError
from splinecompress.model import check_model, save_model

if TYPE_CHECKING:
    import torch

__all__ = ["ExportResult", "build_module", "export_model", "parity_check"]

DEFAULT_OPSET = 17
# Parity tolerance: |onnx - torch| <= ATOL + RTOL * max|torch|, per output. Float32 kernels differ in summation
# order, so the bound scales with the output's magnitude.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4
BATCH_DIM_NAME = "batch"


@dataclass(frozen=True)
class ExportResult:
    """What an export produced and how closely ONNX matched torch."""

    path: str
    exporter: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    batchnorm_nodes: int
    max_abs_diff: float
    tolerance: float



def build_module(spec: str, weights: str | os.PathLike[str] | None = None) -> torch.nn.Module:
    """Build a module from ``"package.module:factory"`` and optionally load a state dict into it.

    The current folder is importable, so ``samples.mnist_net:build_mnist_net`` works from the repository root.

    Raises:
        UsageError: the spec is malformed, the module or factory cannot be found, or the factory does not
            return a torch.nn.Module.
        ExportError: the weights file cannot be read or does not fit the module.
    """
    torch = require_torch("export")
    module_name, sep, factory_name = spec.partition(":")
    if not sep or not module_name or not factory_name:
        raise UsageError(f"model spec '{spec}' must look like MODULE:FACTORY, e.g. samples.mnist_net:build_mnist_net")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"model spec '{spec}': cannot import module '{module_name}': {e}") from e
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"model spec '{spec}': module '{module_name}' has no callable '{factory_name}'")
    net = factory()
    if not isinstance(net, torch.nn.Module):
        raise UsageError(f"model spec '{spec}': {factory_name}() returned {type(net).__name__}, not a torch.nn.Module")
    if weights is not None:
        _load_weights(net, Path(weights))
    return net


def _load_weights(net: torch.nn.Module, path: Path) -> None:
    torch = require_torch("export")
    if not path.is_file():
        raise ExportError(f"weights file {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise ExportError(f"weights file {path}: cannot be read as a torch state dict: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ExportError(f"weights file {path}: holds a {type(state).__name__}, expected a state dict")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ExportError(f"weights file {path}: does not fit the model: {str(e).splitlines()[0]}") from e


def export_model(
    module: torch.nn.Module,
    output_path: str | os.PathLike[str],
    input_shape: tuple[int, ...],
    *,
    input_names: tuple[str, ...] = ("input",),
    output_names: tuple[str, ...] = ("logits",),
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    keep_batchnorm: bool = False,
    dynamo: bool = False,
    seed: int = 0,
) -> ExportResult:
    """Export ``module`` (in eval mode) to ONNX and check that onnxruntime reproduces torch's outputs.

    Args:
        module: the network; it is put in eval mode.
        output_path: where the .onnx goes; written atomically, and only when the parity check passes.
        input_shape: shape of the single float32 input, batch first (e.g. ``(1, 3, 224, 224)``).
        input_names / output_names: names given to the graph's inputs and outputs.
        dynamic_batch: make the first dimension of inputs and outputs symbolic (``"batch"``).
        opset: ONNX opset for the legacy exporter (the dynamo exporter emits 18).
        keep_batchnorm: keep BatchNormalization nodes instead of folding them into Conv.
        dynamo: use the dynamo-based exporter instead of the TorchScript-based one.
        seed: seed of the random parity input.

    Returns:
        An ExportResult with the exporter used, the opset written and the parity error.

    Raises:
        UsageError: bad arguments (empty or non-positive shape, opset out of range).
        ExportError: torch cannot export the module, or ONNX disagrees with torch beyond tolerance.
    """
    torch = require_torch("export")
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or any(d <= 0 for d in input_shape):
        raise UsageError(f"input shape {input_shape} must be non-empty with positive dimensions")
    if not 7 <= opset <= 23:
        raise UsageError(f"opset {opset} is out of range: choose 7..23 (default {DEFAULT_OPSET})")
    output_path = Path(output_path)
    module = module.eval()
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(input_shape, generator=generator)

    with tempfile.TemporaryDirectory(dir=output_path.parent if output_path.parent.exists() else None) as tmp:
        tmp_path = os.path.join(tmp, "model.onnx")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dynamo:
                    _export_dynamo(
                        torch,
                        module,
                        example,
                        tmp_path,
                        input_names,
                        output_names,
                        dynamic_batch,
                        opset,
                        keep_batchnorm,
                    )
                else:
                    _export_legacy(
                        torch,
                        module,
                        example,
                        tmp_path,
                        input_names,
                        output_names,
                        dynamic_batch,
                        opset,
                        keep_batchnorm,
                    )
        except Exception as e:  # torch.onnx raises a wide variety of errors
            raise ExportError(
                f"torch.onnx.export ({'dynamo' if dynamo else 'legacy'}) failed: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            ) from e
        model = onnx.load(tmp_path)
        if dynamic_batch:
            _name_batch_dims(model, input_names, output_names)
        check_model(model, name=f"exported {type(module).__name__}")
        # Check parity on a batch of 2 when the batch is dynamic: that also proves the batch really is dynamic.
        parity_shape = (2, *input_shape[1:]) if dynamic_batch else input_shape
        max_diff, tolerance = parity_check(module, model, parity_shape, seed=seed + 1)
        save_model(model, output_path)

    return ExportResult(
        path=str(output_path),
        exporter="dynamo" if dynamo else "legacy",
        opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0),
        input_names=tuple(v.name for v in model.graph.input),
        output_names=tuple(v.name for v in model.graph.output),
        input_shape=input_shape,
        dynamic_batch=dynamic_batch,
        batchnorm_nodes=sum(n.op_type == "BatchNormalization" for n in model.graph.node),
        max_abs_diff=max_diff,
        tolerance=tolerance,
    )


def _export_legacy(torch, module, example, path, input_names, output_names, dynamic_batch, opset, keep_bn) -> None:
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: BATCH_DIM_NAME} for name in (*input_names, *output_names)}
    torch.onnx.export(
        module,
        (example,),
        path,
        dynamo=False,
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_axes=dynamic_axes,
        opset_version=opset,
        # PRESERVE exports the module in the mode it is in (eval) without the eval-mode BN folding pass.
        training=torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL,
        do_constant_folding=not keep_bn,
    )


def _export_dynamo(torch, module, example, path, input_names, output_names, dynamic_batch, opset, keep_bn) -> None:
    dynamic_shapes = ({0: torch.export.Dim.AUTO},) if dynamic_batch else None
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_shapes=dynamic_shapes,
        opset_version=max(opset, 18),
        optimize=not keep_bn,
        verbose=False,
    )
    program.save(path, external_data=False)


def _name_batch_dims(model: onnx.ModelProto, input_names, output_names) -> None:
    """Give the batch dimension one readable name on every input and output (dynamo names it s0, s1...)."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_DIM_NAME


def parity_check(
    module: torch.nn.Module, model: onnx.ModelProto, input_shape: tuple[int, ...], *, seed: int = 1
) -> tuple[float, float]:
    """Run torch and onnxruntime on one random input; raise when any output differs beyond tolerance.

    Returns:
        (largest absolute difference over outputs, the tolerance it was held to).

    Raises:
        ExportError: output counts or shapes differ, or a difference exceeds the tolerance.
    """
    torch = require_torch("export")
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, generator=generator)
    with torch.no_grad():
        expected = module(x)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    expected = [t.detach().cpu().numpy() for t in expected]

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    actual = session.run(None, {input_name: x.numpy()})
    if len(actual) != len(expected):
        raise ExportError(f"parity check: ONNX model has {len(actual)} outputs, torch module returns {len(expected)}")
    worst_diff, worst_tol = 0.0, 0.0
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if a.shape != e.shape:
            raise ExportError(f"parity check: output {i} has shape {a.shape} in ONNX but {e.shape} in torch")
        diff = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)))) if a.size else 0.0
        tolerance = PARITY_ATOL + PARITY_RTOL * float(np.max(np.abs(e))) if e.size else PARITY_ATOL
        if not diff <= tolerance:  # also catches NaN
            raise ExportError(
                f"parity check: output {i} of the ONNX model differs from torch by {diff:.3g} "
                f"(tolerance {tolerance:.3g}); the export is not faithful"
            )
        if diff >= worst_diff:
            worst_diff, worst_tol = diff, tolerance
    return worst_diff, worst_tol
