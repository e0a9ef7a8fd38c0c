"""Channel dependency analysis: which channels of an ONNX graph must be removed together (Groups).

The analysis walks the graph once in topological order and tracks, for every tensor that carries channels
it understands, a *layout*: the channel axis and the list of channel spaces laid end to end along it. A source
(Conv, ConvTranspose, Gemm, MatMul with constant weights) creates a new space; pass-through ops hand their
input's layout on (slicing their per-channel parameters); Concat lays its inputs' layouts end to end; Flatten
makes each channel own a block of H*W consecutive features; a join (residual Add, squeeze-excite Mul) merges the
spaces of its operands in a union-find. Sinks (Conv input channels, Gemm/MatMul input features) end a layout.

Every op the analysis does not understand freezes the spaces of the tensors it reads, and so does a graph
output: never guess. Each resulting Group lists every slice that removing one of its channels implies.

Example: for ``x -> Conv(c1) -> BN -> Relu -> Conv(c2)`` there is one group for c1's output channels with members
``c1.W[axis 0], c1.B[axis 0], BN.scale/B/mean/var[axis 0], c2.W[axis 1]``, source ``c1``, sink ``c2`` and probe
``BN``'s output (the Relu input); c2's output channels form a second group.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from splinecompress.graph.cost import constant_value, model_cost, node_keys
from splinecompress.model import graph_hash, infer_shapes

__all__ = [
    "CountUpdate",
    "Group",
    "GroupReport",
    "GroupSummary",
    "Groups",
    "Member",
    "analyze_groups",
    "group_summary",
    "register_handler",
]

logger = logging.getLogger(__name__)

# Activations whose input sign is the spline code (DESIGN.md "probes"); SiLU (x * Sigmoid(x)) is found in Mul.
RELU_FAMILY = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip", "HardSwish", "Gelu"})


@dataclass(frozen=True)
class Member:
    """Where a group's channels sit along one axis of one tensor.

    Group channel ``c`` owns the indices ``offset + c * stride + r`` (``0 <= r < stride``) along ``axis`` of
    ``tensor``, which is input ``input`` of node ``node``. ``stride`` is 1 except after Flatten (a channel owns
    H*W consecutive features) or a depthwise Conv with a channel multiplier; ``offset`` is non-zero after a
    Concat. ``role`` says why the slice exists: "source" (a source's output rows and bias), "param" (a
    per-channel parameter of a pass-through op), "sink" (a consumer's input columns), "sink_input" (the
    activation entering a sink: where the masked original multiplies by the keep-mask) or "probe" (an
    activation input whose sign is read during calibration; ``node`` is the activation and ``input`` 0, or, for a
    group without activations, ``node`` is a source and ``input`` -1: its output is the probe).
    """

    node: str
    input: int
    tensor: str
    axis: int
    offset: int
    stride: int
    role: str

    def indices(self, channels: Sequence[int] | np.ndarray) -> np.ndarray:
        """Indices along ``axis`` owned by the given group channels, in channel order."""
        channels = np.asarray(channels, dtype=np.int64).reshape(-1, 1)
        return (self.offset + channels * self.stride + np.arange(self.stride, dtype=np.int64)).reshape(-1)


@dataclass(frozen=True)
class CountUpdate:
    """A channel count written into the graph that surgery must rewrite.

    Examples: the ``group`` attribute of a depthwise Conv, entry 1 of a Reshape's constant shape after a
    Flatten-like reshape, a Split's sizes. The new value is the sum over ``parts`` of (channels kept by the
    group, or ``channels`` when the part is fixed or the group is untouched) times ``stride``.
    """

    node: str
    attr: str | None
    input: int | None
    position: int | None
    parts: tuple[tuple[int | None, int, int], ...]  # (group id or None for fixed channels, channels, stride)

    def value(self, kept: Mapping[int, int]) -> int:
        """The count once each group ``g`` keeps ``kept.get(g, all)`` channels."""
        return sum(kept.get(g, n) * s if g is not None else n * s for g, n, s in self.parts)


@dataclass(frozen=True)
class Group:
    """Channel spaces that must lose exactly the same channels, with every slice that implies.

    Attributes:
        id: stable index, in topological order of the group's first source.
        name: the first source node's name (for people; plans refer to ``id``).
        channels: number of channels in the group.
        prunable: False when some op, output or weight forbids removing any channel.
        reason: why not prunable (None when prunable).
        sources: node keys creating the group's channels.
        sinks: node keys consuming them through weights.
        members: weight slices (roles "source", "param", "sink").
        sink_inputs: activation slices entering the sinks (role "sink_input").
        probes: tensor names where the spline codes are read.
        probe_slices: where in each probe tensor the group's channels sit (a probe after a Concat holds the
            channels of several groups).
    """

    id: int
    name: str
    channels: int
    prunable: bool
    reason: str | None
    sources: tuple[str, ...]
    sinks: tuple[str, ...]
    members: tuple[Member, ...]
    sink_inputs: tuple[Member, ...]
    probes: tuple[str, ...]
    probe_slices: tuple[Member, ...]

    @property
    def label(self) -> str:
        return f"group {self.id} ({self.name})"


@dataclass(frozen=True)
class Groups:
    """Result of :func:`analyze_groups`: the groups of one model (by graph hash) and its channel counts."""

    model_hash: str
    groups: tuple[Group, ...]
    counts: tuple[CountUpdate, ...] = ()

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __getitem__(self, group_id: int) -> Group:
        return self.groups[group_id]

    def prunable(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.prunable)


# ---------------------------------------------------------------------------------------------------------------
# Layouts and the union-find over channel spaces


@dataclass(frozen=True)
class _Seg:
    space: int | None  # None: channels that cannot be removed (a graph input's, an untracked tensor's)
    length: int
    stride: int


@dataclass(frozen=True)
class _Layout:
    rank: int
    axis: int
    segs: tuple[_Seg, ...]

    @property
    def channels(self) -> int:
        return sum(s.length * s.stride for s in self.segs)

    def moved(self, rank: int, axis: int, stride: int = 1) -> _Layout:
        return _Layout(rank, axis, tuple(_Seg(s.space, s.length, s.stride * stride) for s in self.segs))


@dataclass
class _Analysis:
    graph: gs.Graph
    keys: dict[int, str]
    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)  # raw channels of each space
    units: list[int] = field(default_factory=list)  # at a root: the group's channel count (divides every size)
    reasons: dict[int, list[str]] = field(default_factory=dict)
    space_source: list[tuple[str, str]] = field(default_factory=list)  # (node key, output tensor)
    layouts: dict[str, _Layout] = field(default_factory=dict)
    members: list[tuple[int, Member]] = field(default_factory=list)
    counts: list[tuple[str, str | None, int | None, int | None, tuple[_Seg, ...]]] = field(default_factory=list)
    # per node: inputs the handler read, and outputs it deliberately leaves untracked
    taken: set[int] = field(default_factory=set)
    untracked_ok: set[str] = field(default_factory=set)

    # -- union-find
    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.units[ra] = math.gcd(self.units[ra], self.units[rb])
        self.reasons.setdefault(ra, []).extend(self.reasons.pop(rb, []))

    def new_space(self, size: int, node: str, tensor: str) -> int:
        s = len(self.parent)
        self.parent.append(s)
        self.size.append(size)
        self.units.append(size)
        self.space_source.append((node, tensor))
        return s

    def coarsen(self, space: int, units: int) -> None:
        """Make the group of ``space`` remove channels in blocks, so that it has a divisor of ``units`` channels.

        A grouped convolution can only lose whole groups: its input and output spaces become groups whose
        channel c is the block of consecutive raw channels of conv-group c (or of several consecutive ones).
        """
        root = self.find(space)
        self.units[root] = math.gcd(self.units[root], units)

    def freeze(self, layout: _Layout | None, reason: str) -> None:
        if layout is None:
            return
        for seg in layout.segs:
            if seg.space is not None:
                found = self.reasons.setdefault(self.find(seg.space), [])
                if reason not in found:
                    found.append(reason)

    # -- tensors
    def take(self, node: gs.Node, i: int) -> _Layout | None:
        self.taken.add(i)
        tensor = node.inputs[i]
        return self.layouts.get(tensor.name) if tensor.name else None

    def take_first(self, node: gs.Node) -> _Layout | None:
        """The layout of input 0, marking the other inputs (weights, shapes, scales) as read by the handler."""
        for i in range(1, len(node.inputs)):
            self.take(node, i)
        return self.take(node, 0)

    def set(self, tensor: gs.Tensor, layout: _Layout | None) -> None:
        if layout is not None:
            self.layouts[tensor.name] = layout

    @staticmethod
    def const(tensor: gs.Tensor) -> np.ndarray | None:
        if not tensor.name:
            return None
        return constant_value(tensor)

    @staticmethod
    def shape(tensor: gs.Tensor) -> tuple | None:
        return None if tensor.shape is None else tuple(tensor.shape)

    def rank(self, tensor: gs.Tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def dim(self, tensor: gs.Tensor, axis: int) -> int | None:
        shape = self.shape(tensor)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        d = shape[axis]
        return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None

    # -- records
    def member(self, layout: _Layout, node: str, i: int, tensor: str, axis: int, role: str) -> None:
        offset = 0
        for seg in layout.segs:
            if seg.space is not None:
                self.members.append((seg.space, Member(node, i, tensor, axis, offset, seg.stride, role)))
            offset += seg.length * seg.stride

    def join(self, a: _Layout, b: _Layout, reason: str) -> bool:
        """Merge two layouts that must lose the same channels; freeze both when they cannot be matched."""
        if [(s.length, s.stride) for s in a.segs] != [(s.length, s.stride) for s in b.segs]:
            self.freeze(a, reason + " joins tensors whose channel layouts differ")
            self.freeze(b, reason + " joins tensors whose channel layouts differ")
            return False
        for sa, sb in zip(a.segs, b.segs, strict=True):
            if sa.space is not None and sb.space is not None:
                self.union(sa.space, sb.space)
            elif sa.space is not None or sb.space is not None:
                self.freeze(_Layout(a.rank, a.axis, (sa if sa.space is not None else sb,)),
                            reason + " joins them with channels that cannot be removed")
        return True


Handler = Callable[[_Analysis, gs.Node, str], None]
_HANDLERS: dict[str, Handler] = {}


def register_handler(op_types: Sequence[str], handler: Handler) -> None:
    """Register the channel handler of ONNX op types (default domain).

    Raises:
        ValueError: an op type already has a handler.
    """
    for op in op_types:
        if op in _HANDLERS:
            raise ValueError(f"op type '{op}' already has a channel handler ({_HANDLERS[op].__name__})")
        _HANDLERS[op] = handler


def _what(node: gs.Node, key: str) -> str:
    return f"{node.op} '{key}'"


# ---------------------------------------------------------------------------------------------------------------
# Handlers


def _conv(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take_first(node)
    weight = a.const(node.inputs[1])
    if weight is None or weight.ndim < 3:
        a.freeze(layout, f"{_what(node, key)} has a weight that is not a constant")
        return
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is not None and a.const(bias) is None:
        a.freeze(layout, f"{_what(node, key)} has a bias that is not a constant")
        return
    group = int(node.attrs.get("group", 1))
    cout, cin_per_group = int(weight.shape[0]), int(weight.shape[1])
    out = node.outputs[0]
    rank = weight.ndim
    if layout is not None and (layout.axis != 1 or layout.rank != rank):
        a.freeze(layout, f"{_what(node, key)} reads a tensor whose channel axis is not 1")
        layout = None
    if group == 1:
        if layout is not None:
            a.member(layout, key, 1, node.inputs[1].name, 1, "sink")
            a.member(layout, key, 0, node.inputs[0].name, 1, "sink_input")
        _source(a, node, key, cout, rank, weight_axis=0)
        return
    if cin_per_group == 1 and cout % group == 0 and layout is not None and layout.channels == group:
        # depthwise (with channel multiplier m): output channel j reads input channel j // m
        mult = cout // group
        out_layout = layout.moved(rank, 1, stride=mult)
        a.member(out_layout, key, 1, node.inputs[1].name, 0, "param")
        if bias is not None:
            a.member(out_layout, key, 2, bias.name, 0, "param")
        a.counts.append((key, "group", None, None, layout.segs))
        a.set(out, out_layout)
        return
    if layout is not None and cout % group == 0 and len(layout.segs) == 1 and layout.channels == cin_per_group * group:
        seg = layout.segs[0]
        if seg.space is not None and seg.stride == 1:
            # whole conv-groups go: input block c and output block c of the conv together (weight rows only)
            space = a.new_space(cout, key, out.name)
            a.coarsen(seg.space, group)
            a.union(seg.space, space)
            out_layout = _Layout(rank, 1, (_Seg(space, cout, 1),))
            a.member(out_layout, key, 1, node.inputs[1].name, 0, "param")
            if bias is not None:
                a.member(out_layout, key, 2, bias.name, 0, "param")
            a.counts.append((key, "group", None, None, (_Seg(seg.space, group, 1),)))
            a.set(out, out_layout)
            return
    reason = (f"{_what(node, key)} is a grouped convolution (group={group}) whose input channels the analysis "
              "cannot map to whole groups")
    a.freeze(layout, reason)
    space = a.new_space(cout, key, out.name)
    a.reasons[space] = [reason]
    a.set(out, _Layout(rank, 1, (_Seg(space, cout, 1),)))


def _source(a: _Analysis, node: gs.Node, key: str, channels: int, rank: int, weight_axis: int,
            bias_axis: int = 0) -> None:
    out = node.outputs[0]
    out_axis = 1 if node.op != "MatMul" else rank - 1
    space = a.new_space(channels, key, out.name)
    layout = _Layout(rank, out_axis, (_Seg(space, channels, 1),))
    a.member(layout, key, 1, node.inputs[1].name, weight_axis, "source")
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = a.const(node.inputs[2])
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] == channels and channels > 1:
            a.member(layout, key, 2, node.inputs[2].name, bias.ndim - 1 if node.op == "Gemm" else bias_axis,
                     "source")
        elif bias is not None and bias.size > 1:
            a.freeze(layout, f"{_what(node, key)} has a bias of shape {list(bias.shape)} it cannot slice")
    a.set(out, layout)


def _conv_transpose(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take_first(node)
    weight = a.const(node.inputs[1])
    if weight is None or int(node.attrs.get("group", 1)) != 1 or weight.ndim < 3:
        reason = f"{_what(node, key)} is grouped or has a non-constant weight"
        a.freeze(layout, reason)
        return
    if layout is not None and (layout.axis != 1 or layout.rank != weight.ndim):
        a.freeze(layout, f"{_what(node, key)} reads a tensor whose channel axis is not 1")
        layout = None
    if layout is not None:
        a.member(layout, key, 1, node.inputs[1].name, 0, "sink")
        a.member(layout, key, 0, node.inputs[0].name, 1, "sink_input")
    _source(a, node, key, int(weight.shape[1]), weight.ndim, weight_axis=1)


def _gemm(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take_first(node)
    weight = a.const(node.inputs[1])
    if weight is None or weight.ndim != 2 or int(node.attrs.get("transA", 0)):
        a.freeze(layout, f"{_what(node, key)} has a non-constant weight or a transposed input")
        for i in range(1, len(node.inputs)):
            a.freeze(a.layouts.get(node.inputs[i].name), f"{_what(node, key)} reads it as a weight")
        return
    trans_b = int(node.attrs.get("transB", 0))
    if layout is not None and (layout.axis != 1 or layout.rank != 2):
        a.freeze(layout, f"{_what(node, key)} reads a tensor whose feature axis is not 1")
        layout = None
    if layout is not None:
        a.member(layout, key, 1, node.inputs[1].name, 1 if trans_b else 0, "sink")
        a.member(layout, key, 0, node.inputs[0].name, 1, "sink_input")
    _source(a, node, key, int(weight.shape[0 if trans_b else 1]), 2, weight_axis=0 if trans_b else 1)


def _matmul(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take(node, 0)
    other = a.take(node, 1)
    weight = a.const(node.inputs[1])
    rank = a.rank(node.outputs[0]) or (layout.rank if layout is not None else None)
    if weight is None or weight.ndim != 2 or rank is None or rank < 2:
        reason = f"{_what(node, key)} multiplies two computed tensors (only constant right-hand weights are handled)"
        a.freeze(layout, reason)
        a.freeze(other, reason)
        return
    if layout is not None and layout.axis != layout.rank - 1:
        a.freeze(layout, f"{_what(node, key)} contracts an axis that is not the channel axis")
        layout = None
    if layout is not None:
        a.member(layout, key, 1, node.inputs[1].name, 0, "sink")
        a.member(layout, key, 0, node.inputs[0].name, layout.axis, "sink_input")
    _source(a, node, key, int(weight.shape[1]), rank, weight_axis=1)


def _batchnorm(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take_first(node)
    if layout is None:
        return
    if layout.axis != 1:
        a.freeze(layout, f"{_what(node, key)} normalises an axis that is not the channel axis")
        return
    params = node.inputs[1:]
    if any(a.const(t) is None or a.const(t).shape != (layout.channels,) for t in params):
        a.freeze(layout, f"{_what(node, key)} has parameters that are not per-channel constants")
        return
    for i, t in enumerate(params, start=1):
        a.member(layout, key, i, t.name, 0, "param")
    a.set(node.outputs[0], layout)


def _elementwise(a: _Analysis, node: gs.Node, key: str) -> None:
    """Unary activations and binary/variadic arithmetic: pass-through, per-channel constants, or joins."""
    out = node.outputs[0]
    tracked: list[tuple[int, _Layout]] = []
    computed: list[gs.Tensor] = []
    constants: list[tuple[int, gs.Tensor, np.ndarray]] = []
    for i, tensor in enumerate(node.inputs):
        layout = a.take(node, i)
        if not tensor.name:
            continue
        value = a.const(tensor)
        if value is not None:
            constants.append((i, tensor, value))
        elif layout is not None:
            tracked.append((i, layout))
        else:
            computed.append(tensor)
    if not tracked:
        return
    what = _what(node, key)
    out_rank = a.rank(out)
    from_end = {layout.rank - layout.axis for _, layout in tracked}
    if out_rank is None or len(from_end) != 1:
        for _, layout in tracked:
            a.freeze(layout, f"{what} combines tensors whose channel axes do not line up")
        return
    k = from_end.pop()  # the channel axis, counted from the last axis (numpy broadcasting aligns from the end)
    channels = max(layout.channels for _, layout in tracked)
    main = [layout for _, layout in tracked if layout.channels == channels]
    for _, layout in tracked:
        if layout.channels != channels:
            a.freeze(layout, f"{what} broadcasts it over {channels} channels")
    for tensor in computed:
        rank = a.rank(tensor)
        d = None if rank is None else (1 if rank < k else a.dim(tensor, rank - k))
        if d != 1 or channels == 1:
            for layout in main:
                a.freeze(layout, f"{what} combines it with '{tensor.name}', whose channels cannot be removed")
    for i, tensor, value in constants:
        d = value.ndim - k
        if value.ndim > out_rank:
            for layout in main:
                a.freeze(layout, f"{what} broadcasts it to a higher rank")
        elif d < 0 or value.shape[d] == 1:
            continue  # scalar along the channel axis: nothing to slice
        elif value.shape[d] == channels:
            a.member(main[0], key, i, tensor.name, d, "param")
        else:
            for layout in main:
                a.freeze(layout, f"{what} has a constant '{tensor.name}' of shape {list(value.shape)} that does "
                                 "not match its channels")
    for layout in main[1:]:
        a.join(main[0], layout, what)
    if node.op in RELU_FAMILY or _is_silu(node):
        a.member(main[0], key, 0, node.inputs[0].name, main[0].axis, "probe")
    a.set(out, main[0].moved(out_rank, out_rank - k))


def _is_silu(node: gs.Node) -> bool:
    if node.op != "Mul" or len(node.inputs) != 2:
        return False
    x, y = node.inputs
    for gate, other in ((x, y), (y, x)):
        producer = gate.inputs[0] if len(gate.inputs) == 1 else None
        if producer is not None and producer.op == "Sigmoid" and producer.inputs[0].name == other.name:
            return True
    return False


def _pool(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take(node, 0)
    if layout is None:
        return
    if layout.axis != 1:
        a.freeze(layout, f"{_what(node, key)} pools over the channel axis")
        return
    a.set(node.outputs[0], layout)


def _resize(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take_first(node)
    if layout is None:
        return
    what = _what(node, key)
    scale_input = 2 if node.op == "Resize" else 1
    # opset 18 may list the axes that scales/sizes refer to
    axes = [int(x) % layout.rank for x in node.attrs.get("axes", range(layout.rank))]
    if len(node.inputs) > scale_input and node.inputs[scale_input].name:
        scales = a.const(node.inputs[scale_input])
        if scales is None or (scales.size and layout.axis in axes and scales.reshape(-1)[axes.index(layout.axis)] != 1):
            a.freeze(layout, f"{what} may resize the channel axis")
            return
    if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:
        sizes = a.const(node.inputs[3])
        if sizes is None:
            a.freeze(layout, f"{what} has sizes that are not constant")
            return
        if layout.axis in axes:
            a.counts.append((key, None, 3, axes.index(layout.axis), layout.segs))
    a.set(node.outputs[0], layout)


def _pad(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take_first(node)
    if layout is None:
        return
    pads = a.const(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(node.attrs.get("pads", []))
    axes = a.const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    if pads is None or (len(node.inputs) > 3 and node.inputs[3].name and axes is None):
        a.freeze(layout, f"{_what(node, key)} has pads that are not constant")
        return
    axes = list(range(layout.rank)) if axes is None else [int(x) % layout.rank for x in axes.reshape(-1)]
    pads = pads.reshape(-1)
    n = len(axes)
    if pads.size != 2 * n:
        a.freeze(layout, f"{_what(node, key)} has pads the analysis cannot read")
        return
    if layout.axis in axes:
        j = axes.index(layout.axis)
        if pads[j] != 0 or pads[n + j] != 0:
            a.freeze(layout, f"{_what(node, key)} pads the channel axis")
            return
    a.set(node.outputs[0], layout)


def _concat(a: _Analysis, node: gs.Node, key: str) -> None:
    out = node.outputs[0]
    layouts = [a.take(node, i) for i in range(len(node.inputs))]
    tracked = [layout for layout in layouts if layout is not None]
    if not tracked:
        return
    what = _what(node, key)
    rank = a.rank(out) or tracked[0].rank
    axis = int(node.attrs.get("axis", 1)) % rank
    if any(layout.axis != axis for layout in tracked):
        # concatenated along another axis: the channels of all inputs line up one to one
        if len(tracked) == len(layouts) and len({layout.axis for layout in tracked}) == 1:
            for layout in tracked[1:]:
                a.join(tracked[0], layout, what)
            a.set(out, tracked[0])
        else:
            for layout in tracked:
                a.freeze(layout, f"{what} concatenates tensors whose channel axes do not line up")
        return
    segs: list[_Seg] = []
    for tensor, layout in zip(node.inputs, layouts, strict=True):
        if layout is not None:
            segs.extend(layout.segs)
            continue
        d = a.dim(tensor, axis)
        if d is None:
            for t in tracked:
                a.freeze(t, f"{what} concatenates it with '{tensor.name}' of unknown channel count")
            return
        segs.append(_Seg(None, d, 1))
    a.set(out, _Layout(rank, axis, tuple(segs)))


def _flatten(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take(node, 0)
    if layout is None:
        return
    axis = int(node.attrs.get("axis", 1)) % layout.rank
    shape = a.shape(node.inputs[0])
    inner = _product(shape[axis + 1:]) if shape is not None else None
    if axis != layout.axis or inner is None:
        a.freeze(layout, f"{_what(node, key)} mixes the channel axis with other axes")
        return
    # channel c now owns the `inner` consecutive features that were its spatial positions
    a.set(node.outputs[0], layout.moved(2, 1, stride=inner))


def _product(dims: Sequence) -> int | None:
    total = 1
    for d in dims:
        if not isinstance(d, (int, np.integer)) or d < 0:
            return None
        total *= int(d)
    return total


def _reshape(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take(node, 0)
    a.take(node, 1)
    if layout is None:
        return
    what = _what(node, key)
    src, dst = a.shape(node.inputs[0]), a.shape(node.outputs[0])
    ax = layout.axis
    # leading dims stay (an unknown one is the -1 of the shape: the trailing product check below pins it)
    if src is None or dst is None or len(dst) <= ax or any(
        src[i] != dst[i] and isinstance(dst[i], int) for i in range(ax)
    ):
        a.freeze(layout, f"{what} reshapes the channel axis in a way the analysis does not follow")
        return
    inner = _product(src[ax + 1:])
    channels = src[ax]
    if inner is not None and dst[ax] == channels and _product(dst[ax + 1:]) == inner:
        stride = 1
    elif inner is not None and len(dst) == ax + 1 and isinstance(channels, int) and dst[ax] == channels * inner:
        stride = inner
    else:
        a.freeze(layout, f"{what} reshapes the channel axis in a way the analysis does not follow")
        return
    out_layout = layout.moved(len(dst), ax, stride=stride)
    entry = _shape_entry(a, node, 1, ax)
    if entry is None:
        a.freeze(layout, f"{what} has a computed shape whose channel entry the analysis cannot rewrite")
        return
    owner, index, position, value = entry
    if value > 0:
        a.counts.append((owner, None, index, position, out_layout.segs))
    elif value == 0 and stride != 1:
        a.freeze(layout, f"{what} copies the channel count into a flattened axis")
        return
    a.set(node.outputs[0], out_layout)


def _shape_entry(a: _Analysis, node: gs.Node, index: int, position: int) -> tuple[str, int, int, int] | None:
    """Find the constant holding entry ``position`` of shape input ``index`` of ``node``.

    The shape is either a constant or a Concat of 1-D pieces (exporters build ``[batch, C]`` from the input's
    Shape and a constant). Returns (node key, input index, position in that constant, value), or None.
    """
    for _ in range(4):
        tensor = node.inputs[index]
        value = a.const(tensor)
        if value is not None:
            flat = value.reshape(-1)
            return (a.keys[id(node)], index, position, int(flat[position])) if position < flat.size else None
        producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if producer is None or producer.op != "Concat":
            return None
        offset = 0
        for i, piece in enumerate(producer.inputs):
            length = a.dim(piece, 0)
            if length is None or a.rank(piece) != 1:
                return None
            if offset + length > position:
                node, index, position = producer, i, position - offset
                break
            offset += length
        else:
            return None
    return None


def _axes(a: _Analysis, node: gs.Node, input_index: int = 1) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(x) for x in node.attrs["axes"]]
    if len(node.inputs) > input_index and node.inputs[input_index].name:
        value = a.const(node.inputs[input_index])
        return None if value is None else [int(x) for x in value.reshape(-1)]
    return None


def _squeeze(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take_first(node)
    if layout is None:
        return
    axes = _axes(a, node)
    shape = a.shape(node.inputs[0])
    if axes is None and shape is not None:
        axes = [i for i, d in enumerate(shape) if d == 1]
    if axes is None:
        a.freeze(layout, f"{_what(node, key)} squeezes axes the analysis cannot determine")
        return
    axes = [x % layout.rank for x in axes]
    if layout.axis in axes:
        a.freeze(layout, f"{_what(node, key)} squeezes the channel axis")
        return
    new_axis = layout.axis - sum(x < layout.axis for x in axes)
    a.set(node.outputs[0], layout.moved(layout.rank - len(axes), new_axis))


def _unsqueeze(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take_first(node)
    if layout is None:
        return
    axes = _axes(a, node)
    if axes is None:
        a.freeze(layout, f"{_what(node, key)} has axes that are not constant")
        return
    rank = layout.rank + len(axes)
    axes = {x % rank for x in axes}
    kept_positions = [i for i in range(rank) if i not in axes]
    a.set(node.outputs[0], layout.moved(rank, kept_positions[layout.axis]))


def _transpose(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take(node, 0)
    if layout is None:
        return
    perm = [int(p) for p in node.attrs.get("perm", range(layout.rank - 1, -1, -1))]
    a.set(node.outputs[0], layout.moved(layout.rank, perm.index(layout.axis)))


def _reduce(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take_first(node)
    if layout is None:
        return
    axes = _axes(a, node)
    if not axes:
        a.freeze(layout, f"{_what(node, key)} reduces over all axes or over axes that are not constant")
        return
    axes = [x % layout.rank for x in axes]
    if layout.axis in axes:
        a.freeze(layout, f"{_what(node, key)} reduces over the channel axis")
        return
    if int(node.attrs.get("keepdims", 1)):
        a.set(node.outputs[0], layout)
    else:
        a.set(node.outputs[0], layout.moved(layout.rank - len(axes), layout.axis - sum(x < layout.axis for x in axes)))


def _softmax(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take(node, 0)
    if layout is None:
        return
    opset = a.graph.opset or 13
    axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1)) % layout.rank
    # before opset 13 the op flattens axes axis.. into one, so any axis at or before the channels mixes them
    if axis == layout.axis or (opset < 13 and axis <= layout.axis):
        a.freeze(layout, f"{_what(node, key)} normalises over the channel axis")
        return
    a.set(node.outputs[0], layout)


def _slice(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take_first(node)
    if layout is None:
        return
    axes = _axes(a, node, 3)
    if axes is None:
        starts = a.const(node.inputs[1]) if len(node.inputs) > 1 else None
        if starts is None or (len(node.inputs) > 3 and node.inputs[3].name):
            a.freeze(layout, f"{_what(node, key)} slices axes that are not constant")
            return
        axes = list(range(starts.size))
    if layout.axis in [x % layout.rank for x in axes]:
        a.freeze(layout, f"{_what(node, key)} slices the channel axis")
        return
    a.set(node.outputs[0], layout)


def _split(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take_first(node)
    if layout is None:
        return
    what = _what(node, key)
    axis = int(node.attrs.get("axis", 0)) % layout.rank
    if axis != layout.axis:
        for out in node.outputs:
            a.set(out, layout)
        return
    if "split" in node.attrs:
        sizes, source = [int(x) for x in node.attrs["split"]], ("split", None)
    elif len(node.inputs) > 1 and node.inputs[1].name and a.const(node.inputs[1]) is not None:
        sizes, source = [int(x) for x in a.const(node.inputs[1]).reshape(-1)], (None, 1)
    else:
        a.freeze(layout, f"{what} splits the channel axis into equal parts, which pruning would make unequal")
        return
    parts: list[list[_Seg]] = []
    segs = list(layout.segs)
    for size in sizes:
        part, total = [], 0
        while total < size and segs:
            part.append(segs.pop(0))
            total += part[-1].length * part[-1].stride
        if total != size:
            a.freeze(layout, f"{what} splits a channel space in two")
            return
        parts.append(part)
    for position, (out, part) in enumerate(zip(node.outputs, parts, strict=True)):
        a.set(out, _Layout(layout.rank, axis, tuple(part)))
        a.counts.append((key, source[0], source[1], position, tuple(part)))


def _cast_like(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take(node, 0)
    a.take(node, 1)  # only its element type is read: the output does not depend on its channels
    a.untracked_ok.add(node.outputs[0].name)
    a.set(node.outputs[0], layout)


def _shape_op(a: _Analysis, node: gs.Node, key: str) -> None:
    layout = a.take(node, 0)
    a.untracked_ok.add(node.outputs[0].name)
    if layout is None:
        return
    rank = layout.rank
    start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))
    start = max(start + rank, 0) if start < 0 else min(start, rank)
    end = max(end + rank, 0) if end < 0 else min(end, rank)
    if not start <= layout.axis < end:
        return
    position = layout.axis - start
    # Shape -> Gather(index) is how exporters read the batch size; only reading the channel count is a problem.
    for consumer in node.outputs[0].outputs:
        index = a.const(consumer.inputs[1]) if consumer.op == "Gather" and len(consumer.inputs) > 1 else None
        if index is None or int(consumer.attrs.get("axis", 0)) != 0 or position in [
            int(x) % (end - start) for x in index.reshape(-1)
        ]:
            a.freeze(layout, f"{_what(node, key)} reads its channel count (consumed by {consumer.op} "
                             f"'{consumer.name}')")
            return


_UNARY = (
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Gelu", "Softplus", "Softsign", "Mish", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor",
    "Ceil", "Round", "Dropout", "Identity", "Cast",
)
_BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean")

register_handler(("Conv",), _conv)
register_handler(("ConvTranspose",), _conv_transpose)
register_handler(("Gemm",), _gemm)
register_handler(("MatMul",), _matmul)
register_handler(("BatchNormalization", "InstanceNormalization"), _batchnorm)
register_handler(_UNARY + _BINARY, _elementwise)
register_handler(("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"), _pool)
register_handler(("Resize", "Upsample"), _resize)
register_handler(("Pad",), _pad)
register_handler(("Concat",), _concat)
register_handler(("Flatten",), _flatten)
register_handler(("Reshape",), _reshape)
register_handler(("Squeeze",), _squeeze)
register_handler(("Unsqueeze",), _unsqueeze)
register_handler(("Transpose",), _transpose)
register_handler(("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1"), _reduce)
register_handler(("Softmax", "LogSoftmax"), _softmax)
register_handler(("Slice",), _slice)
register_handler(("Split",), _split)
register_handler(("Shape",), _shape_op)
register_handler(("CastLike",), _cast_like)


# ---------------------------------------------------------------------------------------------------------------
# The analysis


def analyze_groups(model: onnx.ModelProto) -> Groups:
    """Find the channel groups of ``model``: what can be removed together, and what cannot and why.

    Args:
        model: an ONNX model; shapes are inferred when it carries no value_info (``load_model`` infers them).

    Returns:
        Groups in topological order of their first source, tied to the model by its graph hash.

    Raises:
        ModelLoadError: shape inference fails on the model.
    """
    if not len(model.graph.value_info) and len(model.graph.node):
        model = infer_shapes(model)
    graph = gs.import_onnx(model)
    keys = node_keys(graph)
    a = _Analysis(graph=graph, keys={id(n): k for n, k in zip(graph.nodes, keys, strict=True)})
    subgraph_names = _subgraph_reads(model)
    for node, key in zip(graph.nodes, keys, strict=True):
        a.taken, a.untracked_ok = set(), set()
        handler = _HANDLERS.get(node.op) if node.domain in (None, "", "ai.onnx") else None
        tracked_in = [a.layouts.get(t.name) for t in node.inputs if t.name in a.layouts]
        if handler is None or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            for layout in tracked_in:
                a.freeze(layout, f"{_what(node, key)} is not understood by the channel analysis")
            continue
        handler(a, node, key)
        for i, tensor in enumerate(node.inputs):
            if i not in a.taken and tensor.name in a.layouts:  # a handler bug must not silently drop a consumer
                a.freeze(a.layouts[tensor.name], f"input {i} of {_what(node, key)} is not handled")
        _check_outputs(a, node, key, tracked_in)
    for value in model.graph.output:
        a.freeze(a.layouts.get(value.name), f"it reaches the graph output '{value.name}'")
    for name in subgraph_names:
        a.freeze(a.layouts.get(name), f"a subgraph reads '{name}'")
    return _collect(a, graph_hash(model))


def _check_outputs(a: _Analysis, node: gs.Node, key: str, tracked_in: list[_Layout]) -> None:
    """Freeze the inputs when an output that depends on their channels is left untracked but is used."""
    if not tracked_in:
        return
    for out in node.outputs:
        if out.name in a.layouts or out.name in a.untracked_ok or not out.name:
            continue
        if out.outputs or any(out.name == o.name for o in a.graph.outputs):
            for layout in tracked_in:
                a.freeze(layout, f"output '{out.name}' of {_what(node, key)} is not understood")
            return


def _subgraph_reads(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
                for sub in subgraphs:
                    names.update(i for n in sub.node for i in n.input)
                    visit(sub)

    visit(model.graph)
    return names


def _collect(a: _Analysis, model_hash: str) -> Groups:
    root_to_id: dict[int, int] = {}
    for space in range(len(a.parent)):
        root_to_id.setdefault(a.find(space), len(root_to_id))
    n = len(root_to_id)
    sources: list[list[str]] = [[] for _ in range(n)]
    source_outputs: list[list[Member]] = [[] for _ in range(n)]  # probes of a group with no activation
    for space, (node, tensor) in enumerate(a.space_source):
        root = a.find(space)
        gid = root_to_id[root]
        if node not in sources[gid]:
            sources[gid].append(node)
            unit = a.size[space] // a.units[root]
            source_outputs[gid].append(Member(node, -1, tensor, 1, 0, unit, "probe"))
    by_role: list[dict[str, list[Member]]] = [{} for _ in range(n)]
    for space, member in a.members:
        root = a.find(space)
        # a group channel is a block of `unit` consecutive raw channels of this space (1 unless grouped convs)
        unit = a.size[space] // a.units[root]
        if unit != 1:
            member = replace(member, stride=member.stride * unit)
        by_role[root_to_id[root]].setdefault(member.role, []).append(member)
    groups = []
    for root, gid in root_to_id.items():
        roles = by_role[gid]
        reasons = a.reasons.get(root, [])
        reason = None
        if reasons:
            reason = "; ".join(reasons[:3]) + (f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else "")
        probe_slices = tuple(roles.get("probe", ()))
        if not probe_slices:
            probe_slices = tuple(source_outputs[gid])
        weights = tuple(m for role in ("source", "param", "sink") for m in roles.get(role, ()))
        groups.append(Group(
            id=gid,
            name=sources[gid][0],
            channels=a.units[root],
            prunable=not reasons,
            reason=reason,
            sources=tuple(sources[gid]),
            sinks=tuple(dict.fromkeys(m.node for m in roles.get("sink", ()))),
            members=weights,
            sink_inputs=tuple(roles.get("sink_input", ())),
            probes=tuple(dict.fromkeys(m.tensor for m in probe_slices)),
            probe_slices=probe_slices,
        ))
    counts = tuple(CountUpdate(node, attr, i, pos, tuple(_part(a, root_to_id, s) for s in segs))
                   for node, attr, i, pos, segs in a.counts)
    logger.info("channel analysis: %d groups, %d prunable", len(groups), sum(g.prunable for g in groups))
    return Groups(model_hash=model_hash, groups=tuple(groups), counts=counts)


def _part(a: _Analysis, root_to_id: dict[int, int], seg: _Seg) -> tuple[int | None, int, int]:
    """A count part in group channels: (group id, group channels, raw count per group channel)."""
    if seg.space is None:
        return None, seg.length, seg.stride
    root = a.find(seg.space)
    channels = a.units[root]
    return root_to_id[root], channels, seg.stride * seg.length // channels


# ---------------------------------------------------------------------------------------------------------------
# Summary rows for `inspect`


@dataclass(frozen=True)
class GroupSummary:
    """One row of the group listing: size, prunable or why not, and the share of MACs the group touches."""

    id: int
    name: str
    channels: int
    prunable: bool
    reason: str | None
    macs: int
    flops_share: float


@dataclass(frozen=True)
class GroupReport:
    """All groups' rows plus totals.

    ``prunable_flops_fraction`` is the share of the model's MACs spent in nodes that touch at least one prunable
    group (as source, sink or per-channel member such as a depthwise Conv); a group's ``flops_share`` counts the
    MACs of the nodes it touches, so shares overlap (a Conv is the sink of one group and the source of the next).
    """

    rows: tuple[GroupSummary, ...]
    total_macs: int
    total_params: int
    prunable_flops_fraction: float
    prunable_channels_fraction: float  # channels in prunable groups / channels in all groups


def group_summary(model: onnx.ModelProto, groups: Groups | None = None) -> GroupReport:
    """Build the rows ``inspect`` prints: one per group, plus the fraction of MACs that is prunable.

    Args:
        model: the model (shapes inferred if missing).
        groups: its groups, if already computed.

    Returns:
        A GroupReport.
    """
    if not len(model.graph.value_info) and len(model.graph.node):
        model = infer_shapes(model)
    groups = groups if groups is not None else analyze_groups(model)
    cost = model_cost(model)
    macs = {n.node: n.macs for n in cost.nodes}
    total = max(cost.macs, 1)
    rows, prunable_nodes = [], set()
    for g in groups:
        nodes = set(g.sources) | {m.node for m in g.members}
        group_macs = sum(macs.get(k, 0) for k in nodes)
        if g.prunable:
            prunable_nodes |= nodes
        rows.append(GroupSummary(g.id, g.name, g.channels, g.prunable, g.reason, group_macs, group_macs / total))
    fraction = sum(macs.get(k, 0) for k in prunable_nodes) / total
    channels = sum(g.channels for g in groups)
    channel_fraction = sum(g.channels for g in groups if g.prunable) / channels if channels else 0.0
    return GroupReport(rows=tuple(rows), total_macs=cost.macs, total_params=cost.params,
                       prunable_flops_fraction=fraction, prunable_channels_fraction=channel_fraction)
