"""Apply a PruningPlan: physically remove channels from an ONNX model.

Surgery validates the whole plan first, then edits a gs copy of the graph: every member initializer of a pruned
group is sliced (source rows, per-channel parameters, sink columns), channel counts written into the graph
(depthwise ``group`` attributes, Reshape shapes, Split sizes) are rewritten, stale shapes are dropped and
re-inferred, and the full onnx.checker runs on the result. The input model is never modified.

Weights are sliced copy-on-write: the legacy exporter makes nodes with identical weights share one initializer,
and two users of one tensor may need different slices (or none). Each distinct slice becomes its own constant;
a constant keeps its name when all its users agree on one slice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from splinecompress.graph.cost import constant_value, model_cost, node_keys
from splinecompress.graph.groups import Groups, analyze_groups
from splinecompress.graph.plan import PruningPlan
from splinecompress.model import check_model, infer_shapes

__all__ = ["SurgeryResult", "apply_plan", "axis_masks", "export_graph"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SurgeryResult:
    """What surgery produced: the slim model and what changed."""

    model: onnx.ModelProto
    modified: bool
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channels_removed: Mapping[int, int]  # group id -> channels removed


def axis_masks(groups: Groups, kept: Mapping[int, np.ndarray], roles: tuple[str, ...]
               ) -> dict[tuple[str, int], dict[int, list[tuple[np.ndarray, np.ndarray]]]]:
    """(node key, input index) -> axis -> [(removed indices along that axis)] for members of the given roles.

    Only groups in ``kept`` (those that lose channels) contribute.
    """
    masks: dict[tuple[str, int], dict[int, list]] = {}
    for group in groups:
        if group.id not in kept:
            continue
        removed = np.setdiff1d(np.arange(group.channels), kept[group.id])
        members = group.sink_inputs if roles == ("sink_input",) else group.members
        for m in members:
            if m.role in roles:
                masks.setdefault((m.node, m.input), {}).setdefault(m.axis, []).append(m.indices(removed))
    return masks


def apply_plan(model: onnx.ModelProto, plan: PruningPlan, groups: Groups | None = None, *,
               check: bool = True) -> SurgeryResult:
    """Remove the channels ``plan`` drops from ``model`` and return the slim model (``model`` is left as is).

    Args:
        model: the model the plan was made for (shapes are inferred if it carries none).
        plan: kept channels per group.
        groups: the model's groups, if already computed.
        check: run the full onnx.checker on the result.

    Returns:
        A SurgeryResult with the slim model and params/MACs before and after.

    Raises:
        PlanError: the plan does not fit the model (see ``PruningPlan.validate``).
        ModelLoadError: the slim model fails shape inference or the checker (a bug: please report it).
    """
    if not len(model.graph.value_info) and len(model.graph.node):
        model = infer_shapes(model)
    groups = groups if groups is not None else analyze_groups(model)
    plan.validate(groups)  # everything is checked before anything is edited
    kept = plan.pruned_groups(groups)
    graph = gs.import_onnx(model)
    cost_before = model_cost(graph)
    if not kept:
        return SurgeryResult(model, False, cost_before.params, cost_before.params, cost_before.macs,
                             cost_before.macs, {})
    nodes = dict(zip(node_keys(graph), graph.nodes, strict=True))
    kept_counts = {gid: len(k) for gid, k in kept.items()}

    # per node input: axis -> removed indices, and count entries to rewrite
    edits = axis_masks(groups, kept, ("source", "param", "sink"))
    count_edits: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for update in groups.counts:
        if not any(g in kept for g, _, _ in update.parts):
            continue
        value = update.value(kept_counts)
        node = nodes[update.node]
        if update.attr is not None:
            if update.position is None:
                node.attrs[update.attr] = value
            else:
                values = list(node.attrs[update.attr])
                values[update.position] = value
                node.attrs[update.attr] = values
        else:
            count_edits.setdefault((update.node, update.input), []).append((update.position, value))

    _rewrite_constants(graph, nodes, edits, count_edits)
    graph.cleanup().toposort()
    slim = export_graph(graph)
    _copy_model_fields(model, slim)
    slim.graph.ClearField("value_info")  # stale shapes: inferred again below
    slim = infer_shapes(slim, name="pruned model")
    if check:
        check_model(slim, name="pruned model")
    cost_after = model_cost(slim)
    removed = {gid: groups[gid].channels - len(k) for gid, k in kept.items()}
    logger.info("surgery: %d groups pruned, params %d -> %d", len(removed), cost_before.params, cost_after.params)
    return SurgeryResult(slim, True, cost_before.params, cost_after.params, cost_before.macs, cost_after.macs,
                         removed)


def _rewrite_constants(graph: gs.Graph, nodes: dict[str, gs.Node], edits: dict, count_edits: dict) -> None:
    """Give every edited node input its sliced constant, copy-on-write, keeping names where users agree."""
    # tensor name -> {edit key -> [(node, input index)]}; users of a tensor that are not edited get key None
    by_tensor: dict[str, dict[object, list[tuple[gs.Node, int]]]] = {}
    specs: dict[object, tuple[dict, list]] = {}
    for node_input in sorted(set(edits) | set(count_edits)):
        node = nodes[node_input[0]]
        tensor = node.inputs[node_input[1]]
        axes = edits.get(node_input, {})
        masks = {axis: np.unique(np.concatenate(removed)) for axis, removed in axes.items()}
        counts = sorted(count_edits.get(node_input, []))
        key = (tensor.name, tuple((axis, m.tobytes()) for axis, m in sorted(masks.items())), tuple(counts))
        specs[key] = (masks, counts)
        by_tensor.setdefault(tensor.name, {}).setdefault(key, []).append((node, node_input[1]))
    tensors = graph.tensors()
    users = _users(graph)
    used_names = set(tensors)
    for name, variants in by_tensor.items():
        edited = {(id(n), i) for uses in variants.values() for n, i in uses}
        untouched = [u for u in users.get(name, []) if (id(u[0]), u[1]) not in edited]
        is_output = any(t.name == name for t in graph.outputs)
        source = tensors[name]
        value = constant_value(source)
        for number, (key, uses) in enumerate(variants.items()):
            masks, counts = specs[key]
            new_value = value
            for axis, removed in masks.items():
                new_value = np.delete(new_value, removed, axis=axis)
            if counts:
                new_value = np.array(new_value, copy=True)
                flat = new_value.reshape(-1)
                for position, count in counts:
                    flat[position] = count
            # keep the name when this slice is the only version of the tensor left in the graph
            sole = len(variants) == 1 and not untouched and not is_output and isinstance(source, gs.Constant)
            new_name = name if sole else _fresh_name(f"{name}_pruned{number}", used_names)
            used_names.add(new_name)
            constant = gs.Constant(new_name, np.ascontiguousarray(new_value))
            if sole:
                source.values = constant.values  # same object, new values: every user sees the slice
                continue
            for node, i in uses:
                node.inputs[i] = constant


def export_graph(graph: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx`` without its side effect on the source model.

    gs exports a lazily loaded constant by reusing the source TensorProto and setting its name; for the
    unnamed tensors inside Constant nodes that marks the name field as set, which changes the caller's model
    (and its graph hash). Loading those small values first keeps the source untouched.
    """
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Constant) and isinstance(value._values, gs.ir.tensor.LazyValues):
                value.values = np.asarray(value.values)
    return gs.export_onnx(graph, do_type_check=True)


def _users(graph: gs.Graph) -> dict[str, list[tuple[gs.Node, int]]]:
    users: dict[str, list[tuple[gs.Node, int]]] = {}
    for node in graph.nodes:
        for i, tensor in enumerate(node.inputs):
            users.setdefault(tensor.name, []).append((node, i))
    return users


def _fresh_name(base: str, used: set[str]) -> str:
    name, k = base, 1
    while name in used:
        name, k = f"{base}_{k}", k + 1
    return name


def _copy_model_fields(original: onnx.ModelProto, new: onnx.ModelProto) -> None:
    new.ir_version = original.ir_version
    del new.opset_import[:]
    new.opset_import.extend(original.opset_import)
    new.producer_name = original.producer_name
    new.producer_version = original.producer_version
    new.domain = original.domain
    new.model_version = original.model_version
    new.doc_string = original.doc_string
    del new.metadata_props[:]
    new.metadata_props.extend(original.metadata_props)
