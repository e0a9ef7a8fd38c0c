"""Training-free repair: compensate in the sinks for the channels a plan removes, before surgery removes them.

Repair edits the *original* model's sinks (their kept weights and biases) so that, once surgery drops the removed
channels, each sink's output on calibration data changes as little as possible. Surgery then runs on the
repaired model, so the equivalence rule still holds exactly: the slim model equals the masked *repaired* model.

- ``bias``: each removed channel is replaced by its calibration mean. The sink's bias absorbs
  W[:, removed] . mean (summed over the kernel for a Conv; per feature for Flatten -> Gemm, where a channel owns
  H*W features); a bias is added where the sink has none (an Add after a MatMul). This also fixes channels whose
  output is a non-zero constant (BN shift leaking through ReLU), which plain removal gets wrong.
- ``lstsq``: least-squares reconstruction ("merging" redundant splines, PAPER.md): with S = E[x~ x~^T] over the
  sink's input patches (x~ = [x; 1]), the new kept weights and bias shift are
  [W'_K, d] = W S[:, K~] (S[K~, K~] + lambda I)^-1, the ridge-regularised regression of the sink's original
  output on its kept inputs. Exact for Gemm and 1x1 Conv on the calibration distribution; for k x k Conv the
  patches (C*k*k features) are sampled. Sinks it cannot handle fall back to ``bias``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from splinecompress.calib.moments import SinkMoments, SinkPatch, sink_patch
from splinecompress.calib.stats import SplineStats
from splinecompress.errors import UnsupportedGraphError, UsageError
from splinecompress.graph.cost import node_keys
from splinecompress.graph.groups import Groups, Member, analyze_groups
from splinecompress.graph.plan import PruningPlan
from splinecompress.model import infer_shapes

__all__ = ["DEFAULT_RIDGE", "REPAIRS", "RepairResult", "lstsq_sinks", "repair_model", "sink_patches"]

log = logging.getLogger(__name__)

REPAIRS = ("none", "bias", "lstsq")
DEFAULT_RIDGE = 1e-3


@dataclass(frozen=True)
class RepairResult:
    """The repaired model, the plan re-tied to it, and which sinks were repaired how."""

    model: onnx.ModelProto
    plan: PruningPlan
    method: str
    repaired: dict[str, str] = field(default_factory=dict)  # sink node -> "bias" | "lstsq"
    skipped: dict[str, str] = field(default_factory=dict)  # sink node -> why not


@dataclass(frozen=True)
class _SinkCut:
    """One group's removed channels as seen by one sink: the weight slice and the channel means."""

    group: int
    member: Member
    removed: np.ndarray  # group channel indices


def _cuts(groups: Groups, plan: PruningPlan) -> dict[str, list[_SinkCut]]:
    """Sink node -> the cuts the plan makes in its weight."""
    cuts: dict[str, list[_SinkCut]] = {}
    for gid, kept in plan.pruned_groups(groups).items():
        group = groups[gid]
        removed = np.setdiff1d(np.arange(group.channels), kept)
        for member in group.members:
            if member.role == "sink":
                cuts.setdefault(member.node, []).append(_SinkCut(gid, member, removed))
    return cuts


def lstsq_sinks(model: onnx.ModelProto, groups: Groups, plan: PruningPlan) -> tuple[list[SinkPatch], dict[str, str]]:
    """The sinks a plan touches whose patch statistics least-squares repair needs, and those it cannot handle."""
    return sink_patches(model, _cuts(groups, plan))


def sink_patches(model: onnx.ModelProto, sinks: Iterable[str]) -> tuple[list[SinkPatch], dict[str, str]]:
    """Patch geometry of each named sink node, and why not for the sinks least squares cannot handle."""
    by_name = {node.name: node for node in model.graph.node}
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    patches, unsupported = [], {}
    for key in dict.fromkeys(sinks):
        node = by_name.get(key)
        if node is None:
            unsupported[key] = "node has no unique name"
            continue
        try:
            patches.append(sink_patch(node, shapes.get(node.input[1]) if len(node.input) > 1 else None))
        except UnsupportedGraphError as e:
            unsupported[key] = str(e)
    return patches, unsupported


def repair_model(
    model: onnx.ModelProto,
    groups: Groups,
    plan: PruningPlan,
    *,
    method: str,
    stats: SplineStats | None = None,
    moments: Mapping[str, SinkMoments] | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> RepairResult:
    """Compensate the sinks of ``model`` for the channels ``plan`` removes.

    Args:
        model: the model the plan was made for (left as is).
        groups: its groups.
        plan: the plan.
        method: "none", "bias" (needs ``stats``) or "lstsq" (needs ``moments``; falls back to bias per sink).
        stats: calibration statistics with sink-input sums.
        moments: sink patch second moments (``calib.moments.collect_moments`` over ``lstsq_sinks``).
        ridge: lstsq regularisation, relative to the mean variance of the kept inputs.

    Returns:
        The repaired model and the plan re-tied to it (its graph hash changes with the weights).

    Raises:
        UsageError: unknown method, or the statistics it needs are missing.
    """
    if method not in REPAIRS:
        raise UsageError(f"repair '{method}' is not one of {', '.join(REPAIRS)}")
    plan.validate(groups)
    if method == "none":
        return RepairResult(model, plan, method)
    if stats is None:
        raise UsageError(f"repair {method} needs calibration statistics (splinecompress analyze)")
    if method == "lstsq" and moments is None:
        raise UsageError("repair lstsq needs sink moments (calib.moments.collect_moments)")

    graph = gs.import_onnx(model)
    nodes = dict(zip(node_keys(graph), graph.nodes, strict=True))
    used_names = {t.name for t in graph.tensors().values()}
    repaired, skipped = {}, {}
    for key, cuts in _cuts(groups, plan).items():
        node = nodes[key]
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if not isinstance(weight, gs.Constant):
            skipped[key] = "weight is not a constant"
            continue
        how = "bias"
        try:
            if method == "lstsq" and key in moments:
                delta, new_weight = _lstsq(node, weight.values, cuts, moments[key], ridge)
                _replace_weight(node, new_weight, used_names)
                how = "lstsq"
            else:
                delta = _bias_delta(node, weight.values, cuts, stats)
            _add_to_bias(graph, node, delta, used_names)
        except UnsupportedGraphError as e:
            skipped[key] = str(e)
            continue
        repaired[key] = how
    for key, why in skipped.items():
        log.info("repair: sink %s left as is: %s", key, why)
    graph.cleanup().toposort()
    repaired_model = gs.export_onnx(graph, do_type_check=True)
    repaired_model.ir_version = model.ir_version
    del repaired_model.opset_import[:]
    repaired_model.opset_import.extend(model.opset_import)
    repaired_model = infer_shapes(repaired_model, name="repaired model")
    return RepairResult(repaired_model, _retie(plan, groups, repaired_model), method, repaired, skipped)


def _retie(plan: PruningPlan, groups: Groups, repaired: onnx.ModelProto) -> PruningPlan:
    """The plan for the repaired model: its hash, and group ids found again by the groups' source nodes.

    Repair adds bias tensors (and Add nodes after MatMuls), so a fresh topological order may number and name the
    groups differently (a joined group is named after whichever source sorts first); node names do not change.
    """
    new_groups = analyze_groups(repaired)
    by_sources = {frozenset(g.sources): g for g in new_groups}
    keep, names, channels = {}, {}, {}
    for gid, kept in plan.keep.items():
        new = by_sources.get(frozenset(groups[gid].sources))
        if new is None or new.channels != groups[gid].channels:
            raise UnsupportedGraphError(f"repair changed {groups[gid].label}: it cannot be found in the repaired model")
        keep[new.id], names[new.id], channels[new.id] = kept, new.name, new.channels
    return dataclasses.replace(plan, model_hash=new_groups.model_hash, keep=keep, names=names, channels=channels)


# -- bias ---------------------------------------------------------------------------------------------------------


def _bias_delta(node: gs.Node, weight: np.ndarray, cuts: list[_SinkCut], stats: SplineStats) -> np.ndarray:
    """sum over removed input features f of W[out, f] * mean(f) (summed over the kernel), per output channel."""
    delta = None
    for cut in cuts:
        group_stats = stats.groups.get(cut.group)
        if group_stats is None:
            raise UnsupportedGraphError(f"no statistics for group {cut.group}")
        sums = group_stats.sink_sums.get(node.inputs[0].name)
        if sums is None:
            raise UnsupportedGraphError(f"no sink-input sums for tensor {node.inputs[0].name}")
        mean = (sums.sums[cut.removed] / max(sums.rows, 1)).reshape(-1)  # channel-major, like Member.indices
        columns = cut.member.indices(cut.removed)
        moved = np.moveaxis(weight.astype(np.float64), cut.member.axis, -1)[..., columns]
        contribution = moved @ mean  # the weight without its input axis
        contribution = contribution.reshape(contribution.shape[0], -1).sum(axis=1)
        delta = contribution if delta is None else delta + contribution
    return _output_scale(node) * delta


def _output_scale(node: gs.Node) -> float:
    """Gemm computes alpha*A*B + beta*C: a shift d of A*B is a shift alpha*d/beta of C."""
    if node.op == "Gemm":
        beta = float(node.attrs.get("beta", 1.0))
        if beta == 0:
            raise UnsupportedGraphError(f"Gemm {node.name} has beta 0: its bias cannot absorb a shift")
        return float(node.attrs.get("alpha", 1.0)) / beta
    return 1.0


def _add_to_bias(graph: gs.Graph, node: gs.Node, delta: np.ndarray, used_names: set[str]) -> None:
    """Add ``delta`` (one value per output channel) to the sink's bias, creating a bias where there is none."""
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            bias = node.inputs[2]
            if not isinstance(bias, gs.Constant):
                raise UnsupportedGraphError(f"{node.op} {node.name}: bias is not a constant")
            if bias.values.shape != delta.shape:
                raise UnsupportedGraphError(
                    f"{node.op} {node.name}: bias of shape {bias.values.shape} is not per output channel"
                )
            values = bias.values + delta.astype(bias.values.dtype)
        else:
            values = delta.astype(node.inputs[1].values.dtype)
        # Copy-on-write: the exporter shares identical biases (all zeros) between nodes.
        new = gs.Constant(_fresh(f"{node.name}.repaired_bias", used_names), np.ascontiguousarray(values))
        if len(node.inputs) > 2:
            node.inputs[2] = new
        else:
            node.inputs.append(new)
        return
    if node.op == "MatMul":
        output = node.outputs[0]
        unbiased = gs.Variable(_fresh(f"{output.name}.unbiased", used_names), dtype=output.dtype)
        node.outputs[0] = unbiased
        shift = gs.Constant(
            _fresh(f"{node.name}.repaired_bias", used_names),
            np.ascontiguousarray(delta.astype(node.inputs[1].values.dtype)),
        )
        graph.nodes.append(
            gs.Node(
                "Add", name=_fresh(f"{node.name}.repair_add", used_names), inputs=[unbiased, shift], outputs=[output]
            )
        )
        return
    raise UnsupportedGraphError(f"{node.op} sinks cannot take a bias")


def _fresh(base: str, used: set[str]) -> str:
    name, k = base, 1
    while name in used:
        k += 1
        name = f"{base}.{k}"
    used.add(name)
    return name


# -- least squares -------------------------------------------------------------------------------------------------


def _as_matrix(node: gs.Node, weight: np.ndarray) -> np.ndarray:
    """The sink's weight as [outputs, features], features in the order calib.moments cuts patches."""
    if node.op == "Conv":
        return weight.reshape(weight.shape[0], -1)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return weight
    if node.op in ("Gemm", "MatMul") and weight.ndim == 2:
        return weight.T
    raise UnsupportedGraphError(f"least-squares repair does not support this {node.op} weight ({node.name})")


def _from_matrix(node: gs.Node, matrix: np.ndarray, like: np.ndarray) -> np.ndarray:
    if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)):
        return matrix.reshape(like.shape).astype(like.dtype)
    return matrix.T.astype(like.dtype)


def _lstsq(
    node: gs.Node, weight: np.ndarray, cuts: list[_SinkCut], moments: SinkMoments, ridge: float
) -> tuple[np.ndarray, np.ndarray]:
    """New weight (removed columns untouched: surgery drops them) and the bias shift."""
    matrix = _as_matrix(node, weight).astype(np.float64)
    features = matrix.shape[1]
    second = moments.second_moment()
    if second.shape != (features + 1, features + 1):
        raise UnsupportedGraphError(f"patch statistics of {node.name} do not match its weight")
    per_channel = features // weight.shape[1] if node.op == "Conv" else 1  # kernel positions per input channel
    removed_inputs = np.concatenate([cut.member.indices(cut.removed) for cut in cuts])
    removed = (removed_inputs[:, None] * per_channel + np.arange(per_channel)[None, :]).reshape(-1)
    kept = np.setdiff1d(np.arange(features), removed)
    regressors = np.append(kept, features)  # kept features and the constant
    gram = second[np.ix_(regressors, regressors)].copy()
    scale = float(np.mean(np.diag(gram)[:-1])) if len(kept) else 1.0
    gram[np.arange(len(kept)), np.arange(len(kept))] += ridge * max(scale, 1e-12)
    cross = matrix @ second[:features][:, regressors]  # E[y z^T] with y = W x
    solution = np.linalg.solve(gram, cross.T).T  # [outputs, |K| + 1]
    new_matrix = matrix.copy()
    new_matrix[:, kept] = solution[:, :-1]
    delta = _output_scale(node) * solution[:, -1]
    return delta, _from_matrix(node, new_matrix, weight)


def _replace_weight(node: gs.Node, values: np.ndarray, used_names: set[str]) -> None:
    # Copy-on-write: never edit a weight another node may share.
    node.inputs[1] = gs.Constant(_fresh(f"{node.name}.repaired_weight", used_names), np.ascontiguousarray(values))
