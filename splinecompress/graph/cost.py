"""Parameters and FLOPs (multiply-accumulates) per node and in total, from a graph with inferred shapes.

MACs are counted for the ops that dominate inference cost: Conv, ConvTranspose, Gemm and MatMul (one MAC per
weight use). Elementwise ops, normalisation and pooling are counted as 0 MACs: they are memory bound and would
only blur the ratio that pruning changes. A symbolic batch dimension counts as ``batch`` (1 by default); any
other unknown dimension makes that node's MACs unknown (0, and ``ModelCost.complete`` is False).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

__all__ = ["ModelCost", "NodeCost", "constant_value", "model_cost", "node_keys", "node_macs"]


@dataclass(frozen=True)
class NodeCost:
    """Cost of one node: the parameters it reads (constants among its inputs) and its MACs."""

    node: str
    op_type: str
    params: int
    macs: int


@dataclass(frozen=True)
class ModelCost:
    """Cost of a whole model.

    ``params`` counts every distinct constant tensor once (a weight shared by two nodes counts once), so it is
    less than or equal to the sum of the nodes' params. ``complete`` is False when some node's MACs could not be
    computed because a dimension other than the batch is unknown.
    """

    nodes: tuple[NodeCost, ...]
    params: int
    macs: int
    complete: bool

    def by_node(self) -> dict[str, NodeCost]:
        return {n.node: n for n in self.nodes}


def node_keys(graph: gs.Graph) -> list[str]:
    """A stable key per node of ``graph``, in node order: its name, or ``#<index>`` if unnamed or duplicated.

    Groups, plans and surgery refer to nodes by these keys; they are stable for one model because gs keeps the
    ONNX node order on import.
    """
    counts: dict[str, int] = {}
    for node in graph.nodes:
        counts[node.name] = counts.get(node.name, 0) + 1
    return [n.name if n.name and counts[n.name] == 1 else f"#{i}" for i, n in enumerate(graph.nodes)]


def constant_value(tensor: gs.Tensor, _depth: int = 0) -> np.ndarray | None:
    """The value of ``tensor`` if it is constant, else None.

    Constant means an initializer, a Constant node's output, or a short chain of Identity, Cast, CastLike,
    Shape (of a constant) and Expand over those. The legacy exporter hands shared weights to their users through
    Identity nodes; torch's dynamo exporter (unoptimised, as when BatchNorm is kept) builds the zero bias of a
    bias-free Conv as ``Expand(CastLike(0, x), Shape(W)[0:1])``.
    """
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if _depth > 8 or len(tensor.inputs) != 1:  # bounded: such chains are short
        return None
    producer = tensor.inputs[0]
    if producer.op == "Constant" and not producer.inputs:
        return _constant_attr(producer)
    fold = _FOLDERS.get(producer.op)
    if fold is None or producer.domain not in (None, "", "ai.onnx") or not producer.inputs:
        return None
    return fold(producer, _depth + 1)


def _fold_shape(node: gs.Node, depth: int) -> np.ndarray | None:
    source = node.inputs[0]
    # a constant's shape is known without loading its values
    shape = source.shape if isinstance(source, gs.Constant) else getattr(constant_value(source, depth), "shape", None)
    if shape is None:
        return None
    start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
    return np.asarray(shape, dtype=np.int64)[start:end]


def _fold_cast(node: gs.Node, depth: int) -> np.ndarray | None:
    value = constant_value(node.inputs[0], depth)
    if value is None:
        return None
    if node.op == "CastLike":
        dtype = node.inputs[1].dtype if len(node.inputs) > 1 else None
    else:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])) if "to" in node.attrs else None
    return None if dtype is None else value.astype(np.dtype(dtype))


def _fold_expand(node: gs.Node, depth: int) -> np.ndarray | None:
    value = constant_value(node.inputs[0], depth)
    shape = constant_value(node.inputs[1], depth) if len(node.inputs) > 1 else None
    if value is None or shape is None:
        return None
    return value * np.ones(tuple(int(d) for d in shape.reshape(-1)), dtype=value.dtype)


def _fold_reshape(node: gs.Node, depth: int) -> np.ndarray | None:
    value = constant_value(node.inputs[0], depth)
    shape = constant_value(node.inputs[1], depth) if len(node.inputs) > 1 else None
    if value is None or shape is None:
        return None
    dims = [int(d) for d in shape.reshape(-1)]
    if not int(node.attrs.get("allowzero", 0)):
        dims = [value.shape[i] if d == 0 else d for i, d in enumerate(dims)]  # 0 copies the input's dimension
    return value.reshape(dims)


_FOLDERS = {
    "Reshape": _fold_reshape,
    "Identity": lambda node, depth: constant_value(node.inputs[0], depth),
    "Shape": _fold_shape,
    "Cast": _fold_cast,
    "CastLike": _fold_cast,
    "Expand": _fold_expand,
}


def _constant_attr(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return np.asarray(value.values) if isinstance(value, gs.Constant) else np.asarray(value)
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(list(attrs[key]), dtype=dtype)
    return None


def _shape(tensor: gs.Tensor, batch: int) -> tuple[int, ...] | None:
    shape = tensor.shape
    if shape is None:
        return None
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, (int, np.integer)) and d >= 0:
            dims.append(int(d))
        elif i == 0:
            dims.append(batch)  # the symbolic batch
        else:
            return None
    return tuple(dims)


def node_macs(node: gs.Node, batch: int = 1) -> int | None:
    """Multiply-accumulates of one node, or None when a needed shape is unknown (0 for ops not counted)."""
    op = node.op
    if op in ("Conv", "ConvTranspose"):
        if len(node.inputs) < 2 or node.inputs[1].shape is None:
            return None
        w = _shape(node.inputs[1], batch)
        if w is None:
            return None
        if op == "Conv":
            out = _shape(node.outputs[0], batch)
            # each output element reads Cin/group * prod(kernel) inputs: exactly the weight's row size
            return None if out is None else int(np.prod(out)) * int(np.prod(w[1:]))
        x = _shape(node.inputs[0], batch)
        # ConvTranspose scatters each input element over Cout/group * prod(kernel) outputs
        return None if x is None else int(np.prod(x)) * int(np.prod(w[1:]))
    if op in ("Gemm", "MatMul"):
        a = _shape(node.inputs[0], batch)
        out = _shape(node.outputs[0], batch)
        if a is None or out is None or not a:
            return None
        k = a[0] if op == "Gemm" and int(node.attrs.get("transA", 0)) else a[-1]
        return int(np.prod(out)) * k
    return 0


def model_cost(model: onnx.ModelProto | gs.Graph, *, batch: int = 1) -> ModelCost:
    """Parameters and MACs of every node and of the whole model.

    Args:
        model: an ONNX model (shapes are inferred if it carries none) or a gs graph with shapes.
        batch: the value a symbolic batch dimension takes.

    Returns:
        A ModelCost; ``nodes`` follows the graph's node order and is keyed like :func:`node_keys`.
    """
    graph = model if isinstance(model, gs.Graph) else gs.import_onnx(_with_shapes(model))
    keys = node_keys(graph)
    nodes = []
    complete = True
    unique_params: dict[str, int] = {}
    for key, node in zip(keys, graph.nodes, strict=True):
        params = 0
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                size = int(np.prod(tensor.shape))
                params += size
                unique_params[tensor.name] = size
        macs = node_macs(node, batch)
        if macs is None:
            complete = False
            macs = 0
        nodes.append(NodeCost(node=key, op_type=node.op, params=params, macs=macs))
    return ModelCost(nodes=tuple(nodes), params=sum(unique_params.values()), macs=sum(n.macs for n in nodes),
                     complete=complete)


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    if len(model.graph.value_info):
        return model
    from splinecompress.model import infer_shapes

    return infer_shapes(model)
