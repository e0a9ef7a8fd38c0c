"""The equivalence rule: a slim model must compute exactly what its masked original computes.

The masked original is the original model with every sink input of a pruned group multiplied by the group's
keep-mask along the channel axis (0 for removed channels, 1 for kept ones). Physical removal and masking agree
because every consumer of a prunable group's channels is either a member op (which works channel by channel)
or a sink; a removed channel's value, even a non-zero constant one, can only reach the output through a sink.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from splinecompress.errors import UsageError
from splinecompress.graph.cost import node_keys
from splinecompress.graph.groups import Groups, analyze_groups
from splinecompress.graph.plan import PruningPlan
from splinecompress.graph.surgery import _copy_model_fields, axis_masks, export_graph
from splinecompress.model import infer_shapes, input_specs

__all__ = ["EquivalenceResult", "check_equivalence", "masked_original", "random_inputs"]

DEFAULT_RTOL = 1e-4


@dataclass(frozen=True)
class EquivalenceResult:
    """How far the slim model is from the masked original.

    ``max_rel`` is, over outputs, the largest ``max|slim - masked| / max|masked|``.
    """

    max_abs: float
    max_rel: float
    rtol: float
    passed: bool
    outputs: tuple[str, ...]

    def describe(self) -> str:
        verdict = "equivalent" if self.passed else "NOT equivalent"
        return (f"{verdict} to the masked original: max abs diff {self.max_abs:.3g}, max rel diff "
                f"{self.max_rel:.3g} (tolerance {self.rtol:.3g})")


def masked_original(model: onnx.ModelProto, plan: PruningPlan, groups: Groups | None = None) -> onnx.ModelProto:
    """The original model with each sink input of a pruned group multiplied by its 0/1 keep-mask.

    Args:
        model: the model the plan was made for.
        plan: the plan.
        groups: the model's groups, if already computed.

    Returns:
        A new model (``model`` is left as is).

    Raises:
        PlanError: the plan does not fit the model.
    """
    if not len(model.graph.value_info) and len(model.graph.node):
        model = infer_shapes(model)
    groups = groups if groups is not None else analyze_groups(model)
    plan.validate(groups)
    kept = plan.pruned_groups(groups)
    graph = gs.import_onnx(model)
    nodes = dict(zip(node_keys(graph), graph.nodes, strict=True))
    masks: dict[tuple[str, tuple[int, bytes]], gs.Variable] = {}  # share one Mul per tensor and mask
    for (key, i), axes in sorted(axis_masks(groups, kept, ("sink_input",)).items()):
        node = nodes[key]
        tensor = node.inputs[i]
        (axis, removed), = axes.items()  # a sink input has one channel axis
        removed = np.unique(np.concatenate(removed))
        if tensor.shape is None or not isinstance(tensor.shape[axis], (int, np.integer)):
            raise UsageError(f"masked original: the channel count of '{tensor.name}' (input of {node.op} "
                             f"'{node.name}') is unknown")
        rank, size = len(tensor.shape), int(tensor.shape[axis])
        cache_key = (tensor.name, (axis, removed.tobytes()))
        if cache_key not in masks:
            mask = np.ones(size, dtype=_np_dtype(tensor))
            mask[removed] = 0
            shape = [1] * rank
            shape[axis] = size
            masked = gs.Variable(f"{tensor.name}_keepmask{len(masks)}", dtype=tensor.dtype, shape=tensor.shape)
            constant = gs.Constant(f"{tensor.name}_keepmask{len(masks)}_value", mask.reshape(shape))
            graph.nodes.append(gs.Node("Mul", name=f"{tensor.name}_keepmask{len(masks)}_mul",
                                       inputs=[tensor, constant], outputs=[masked]))
            masks[cache_key] = masked
        node.inputs[i] = masks[cache_key]
    graph.toposort()
    masked_model = export_graph(graph)
    _copy_model_fields(model, masked_model)
    return masked_model


def _np_dtype(tensor: gs.Tensor) -> np.dtype:
    dtype = tensor.dtype
    if dtype is None:
        return np.dtype(np.float32)
    if isinstance(dtype, int):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
    return np.dtype(dtype)


def random_inputs(model: onnx.ModelProto, *, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for every input of ``model``: standard normal floats, zeros for integer inputs.

    A symbolic first dimension becomes ``batch``.

    Raises:
        UsageError: an input has an unknown rank or an unknown dimension other than the first.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in input_specs(model):
        if spec.shape is None or any(not isinstance(d, int) for d in spec.shape[1:]):
            raise UsageError(f"input '{spec.name}' has shape {spec.shape_text()}: give inputs explicitly")
        shape = tuple(batch if i == 0 and not isinstance(d, int) else d for i, d in enumerate(spec.shape))
        dtype = spec.dtype if spec.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds


def _run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # basic optimizations only: the same kernels on both sides, no layout-changing fusions to blur the comparison
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def check_equivalence(original: onnx.ModelProto, slim: onnx.ModelProto, plan: PruningPlan,
                      groups: Groups | None = None, *, inputs: Mapping[str, np.ndarray] | None = None,
                      seed: int = 0, rtol: float = DEFAULT_RTOL, batch: int = 2) -> EquivalenceResult:
    """Run the masked original and the slim model on the same inputs in onnxruntime (CPU) and compare.

    Args:
        original: the model the plan was made for.
        slim: the pruned model.
        plan: the plan that made ``slim``.
        groups: the original's groups, if already computed.
        inputs: feeds; random ones (batch ``batch``, seed ``seed``) when None.
        rtol: largest allowed ``max|slim - masked| / max|masked|`` per output.

    Returns:
        An EquivalenceResult (``passed`` False also when a difference is NaN).

    Raises:
        PlanError: the plan does not fit ``original``.
        UsageError: the outputs of the two models differ in number or shape.
    """
    masked = masked_original(original, plan, groups)
    feeds = dict(inputs) if inputs is not None else random_inputs(original, batch=batch, seed=seed)
    expected = _run(masked, feeds)
    actual = _run(slim, feeds)
    if len(expected) != len(actual):
        raise UsageError(f"slim model has {len(actual)} outputs, the original has {len(expected)}")
    max_abs = max_rel = 0.0
    passed = True
    for name, e, a in zip([o.name for o in original.graph.output], expected, actual, strict=True):
        if e.shape != a.shape:
            raise UsageError(f"output '{name}' has shape {a.shape} in the slim model but {e.shape} in the original")
        diff = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)))) if e.size else 0.0
        scale = float(np.max(np.abs(e))) if e.size else 0.0
        rel = diff / scale if scale > 0 else diff
        passed = passed and rel <= rtol  # False for NaN too
        max_abs, max_rel = max(max_abs, diff), max(max_rel, rel)
        if np.isnan(diff):
            max_abs = max_rel = float("nan")
    return EquivalenceResult(max_abs=max_abs, max_rel=max_rel, rtol=rtol, passed=bool(passed),
                             outputs=tuple(o.name for o in original.graph.output))
