"""Channel dependency analysis on tiny hand-built graphs: one behaviour per test, structure and numbers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from splinecompress.graph.equivalence import check_equivalence
from splinecompress.graph.groups import analyze_groups, group_summary, register_handler
from splinecompress.graph.plan import PruningPlan, random_plan
from splinecompress.graph.surgery import apply_plan
from splinecompress.model import graph_hash
from tests.zoo import Net


def prune_and_check(model: onnx.ModelProto, ratio: float = 0.4, seed: int = 0):
    groups = analyze_groups(model)
    plan = random_plan(groups, ratio, seed=seed)
    result = apply_plan(model, plan, groups)
    check = check_equivalence(model, result.model, plan, groups)
    assert check.passed, check.describe()
    return groups, plan, result


def test_conv_bn_relu_conv_members_sinks_and_probes() -> None:
    net = Net()
    h = net.op("Relu", [net.bn(net.conv("x", 3, 8, name="c1"), 8)])
    y = net.conv(h, 8, 4, name="c2")
    model = net.model(y)
    groups = analyze_groups(model)
    assert [g.name for g in groups] == ["c1", "c2"], [g.name for g in groups]
    g = groups[0]
    assert g.prunable and g.channels == 8 and g.sources == ("c1",) and g.sinks == ("c2",), g
    roles = sorted((m.role, m.node, m.input, m.axis) for m in g.members)
    assert ("sink", "c2", 1, 1) in roles and ("source", "c1", 1, 0) in roles and ("source", "c1", 2, 0) in roles
    assert sum(r[0] == "param" for r in roles) == 4, f"BN has 4 per-channel parameters: {roles}"
    assert g.probes == (net.nodes[1].output[0],), f"the probe is the Relu input (BN output): {g.probes}"
    assert not groups[1].prunable and "graph output" in groups[1].reason, groups[1].reason
    _, _, result = prune_and_check(model)
    w = {t.name: t for t in result.model.graph.initializer}
    assert w["w0"].dims[0] < 8, "c1's weight lost rows"


def test_residual_add_joins_groups() -> None:
    net = Net()
    a = net.conv("x", 3, 8, name="a")
    b = net.conv(net.op("Relu", [a]), 8, 8, name="b")
    s = net.op("Relu", [net.op("Add", [a, b], name="join")])
    y = net.gemm(net.op("Flatten", [net.op("GlobalAveragePool", [s])]), 8, 5, name="fc")
    groups = analyze_groups(net.model(y))
    joined = [g for g in groups if "a" in g.sources]
    assert len(joined) == 1 and set(joined[0].sources) == {"a", "b"}, [g.sources for g in groups]
    assert set(joined[0].sinks) == {"b", "fc"}, joined[0].sinks
    prune_and_check(net.model(y))


def test_concat_offsets_and_flatten_blocks() -> None:
    net = Net(size=4)
    a = net.op("Relu", [net.conv("x", 3, 4, name="a")])
    b = net.op("Relu", [net.conv("x", 3, 6, name="b")])
    cat = net.op("Concat", [a, b, "x"], name="cat", axis=1)  # x: 3 channels that cannot be removed
    y = net.gemm(net.op("Flatten", [cat], axis=1), 13 * 16, 5, name="fc")
    model = net.model(y)
    groups = analyze_groups(model)
    fc_b = next(m for g in groups if g.name == "b" for m in g.members if m.node == "fc")
    assert (fc_b.offset, fc_b.stride, fc_b.axis) == (4 * 16, 16, 1), fc_b
    np.testing.assert_array_equal(fc_b.indices([1]), np.arange(64 + 16, 64 + 32))
    _, plan, result = prune_and_check(model)
    kept = len(plan.keep[0]) + len(plan.keep[1]) + 3
    fc = next(t for t in result.model.graph.initializer if t.name == net.nodes[-1].input[1])
    assert list(fc.dims) == [5, kept * 16], fc.dims


def test_unsupported_op_freezes_its_group_only() -> None:
    net = Net()
    a = net.conv("x", 3, 8, name="a")
    weird = net.op("LRN", [a], name="weird", size=3)  # mixes neighbouring channels
    b = net.conv(net.op("Relu", [weird]), 8, 8, name="b")
    c = net.conv(net.op("Relu", [b]), 8, 4, name="c")
    model = net.model(c)
    groups = analyze_groups(model)
    by_name = {g.name: g for g in groups}
    assert not by_name["a"].prunable
    assert "LRN 'weird'" in by_name["a"].reason and "not understood" in by_name["a"].reason, by_name["a"].reason
    assert by_name["b"].prunable, by_name["b"].reason
    _, plan, _ = prune_and_check(model)
    assert list(plan.keep) == [by_name["b"].id], "only the understood group is pruned"


def test_graph_output_freezes_its_group() -> None:
    net = Net()
    a = net.conv("x", 3, 8, name="a")
    b = net.conv(a, 8, 4, name="b")
    groups = analyze_groups(net.model(b, a))
    assert "reaches the graph output 'a_out'" in groups[0].reason, groups[0].reason


def test_depthwise_conv_group_attribute_follows() -> None:
    net = Net()
    a = net.op("Clip", [net.conv("x", 3, 8, name="a"), net.const(np.float32(0), "lo"), net.const(np.float32(6), "hi")])
    d = net.op("Clip", [net.conv(a, 8, 8, group=8, name="dw"), "lo", "hi"])
    y = net.conv(d, 8, 4, k=1, name="pw")
    model = net.model(y)
    groups = analyze_groups(model)
    assert groups[0].sources == ("a",) and "dw" in {m.node for m in groups[0].members}, groups[0]
    assert len(groups[0].probes) == 2, f"both Clip inputs are probes: {groups[0].probes}"
    _, plan, result = prune_and_check(model)
    dw = next(n for n in result.model.graph.node if n.name == "dw")
    group = next(a.i for a in dw.attribute if a.name == "group")
    assert group == len(plan.keep[0]), f"depthwise group {group} != kept {len(plan.keep[0])}"


def test_grouped_conv_loses_whole_groups() -> None:
    net = Net()
    a = net.conv("x", 3, 16, name="a")
    g = net.conv(net.op("Relu", [a]), 16, 24, group=4, name="grouped")  # 4 groups: 4 in, 6 out channels each
    y = net.conv(net.op("Relu", [g]), 24, 4, name="c")
    model = net.model(y)
    groups = analyze_groups(model)
    g0 = groups[0]
    assert g0.prunable and g0.channels == 4 and set(g0.sources) == {"a", "grouped"}, g0
    strides = {(m.node, m.input, m.axis): m.stride for m in g0.members}
    assert strides[("a", 1, 0)] == 4 and strides[("grouped", 1, 0)] == 6 and strides[("c", 1, 1)] == 6, strides
    assert ("grouped", 1, 1) not in strides, "a grouped conv's per-group input axis is never sliced"
    plan = PruningPlan(groups.model_hash, {0: (1, 3)})
    result = apply_plan(model, plan, groups)
    assert check_equivalence(model, result.model, plan, groups).passed
    conv = next(n for n in result.model.graph.node if n.name == "grouped")
    assert next(at.i for at in conv.attribute if at.name == "group") == 2, "two of four conv groups remain"


def test_grouped_convs_with_different_group_counts_share_the_coarser_blocks() -> None:
    net = Net()
    a = net.conv("x", 3, 16, name="a")
    g4 = net.conv(a, 16, 16, group=4, name="g4")
    g2 = net.conv(a, 16, 16, group=2, name="g2")
    model = net.model(net.conv(net.op("Add", [g4, g2]), 16, 4, name="c"))
    groups = analyze_groups(model)
    assert groups[0].channels == 2, f"blocks of 8 channels satisfy both group=4 and group=2: {groups[0]}"
    prune_and_check(model, ratio=0.5)


def test_grouped_conv_after_concat_is_frozen_with_a_reason() -> None:
    net = Net()
    cat = net.op("Concat", [net.conv("x", 3, 4, name="a"), net.conv("x", 3, 4, name="b")], axis=1)
    y = net.conv(net.conv(cat, 8, 8, group=2, name="grouped"), 8, 4, name="c")
    groups = analyze_groups(net.model(y))
    assert not groups[0].prunable and "grouped convolution (group=2)" in groups[0].reason, groups[0].reason


def test_shared_initializer_is_copied_on_write() -> None:
    net = Net()
    w = net.const(net.rng.standard_normal((8, 3, 3, 3)) * 0.3, "shared")
    a = net.op("Conv", ["x", w], "a", pads=[1] * 4)
    b = net.op("Conv", ["x", w], "b", pads=[1] * 4)
    ya = net.conv(net.op("Relu", [a]), 8, 4, name="ha")
    yb = net.conv(net.op("Relu", [b]), 8, 4, name="hb")
    model = net.model(net.op("Add", [ya, yb], name="out"))
    groups = analyze_groups(model)
    ga = next(g for g in groups if g.name == "a")
    plan = PruningPlan(groups.model_hash, {ga.id: (0, 2, 5)})
    result = apply_plan(model, plan, groups)
    assert check_equivalence(model, result.model, plan, groups).passed
    weights = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert weights["shared"] == [8, 3, 3, 3], f"b's weight must stay whole: {weights}"
    assert [3, 3, 3, 3] in weights.values(), f"a gets a sliced copy: {weights}"
    assert graph_hash(model) == groups.model_hash, "the input model was modified"


def test_squeeze_excite_and_silu() -> None:
    net = Net()
    a = net.conv("x", 3, 8, name="a")
    x = net.op("Mul", [a, net.op("Sigmoid", [a])], name="silu")
    s = net.op("GlobalAveragePool", [x])
    s = net.op("Relu", [net.conv(s, 8, 2, k=1, name="se_reduce")])
    gate = net.op("Sigmoid", [net.conv(s, 2, 8, k=1, name="se_expand")])
    y = net.conv(net.op("Mul", [x, gate], name="se_mul"), 8, 4, name="out")
    model = net.model(y)
    groups = analyze_groups(model)
    g = groups[0]
    assert set(g.sources) == {"a", "se_expand"}, g.sources
    assert a in g.probes, f"the SiLU input is a probe: {g.probes}"
    prune_and_check(model)


def test_reshape_with_constant_shape_is_rewritten() -> None:
    net = Net(size=4)
    a = net.op("Relu", [net.conv("x", 3, 6, name="a")])
    flat = net.op("Reshape", [a, "shape"], name="flat")
    net.inits.append(numpy_helper.from_array(np.array([-1, 96], dtype=np.int64), "shape"))
    model = net.model(net.gemm(flat, 96, 5, name="fc"))
    _, plan, result = prune_and_check(model)
    shape = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "shape"))
    assert list(shape) == [-1, len(plan.keep[0]) * 16], shape


def test_per_channel_constant_and_prelu_are_sliced() -> None:
    net = Net()
    a = net.conv("x", 3, 8, name="a")
    scaled = net.op("Mul", [a, net.const(net.rng.uniform(0.5, 2, (8, 1, 1)))], name="scale")
    p = net.op("PRelu", [scaled, net.const(net.rng.uniform(0, 0.3, (8, 1, 1)))], name="prelu")
    model = net.model(net.conv(p, 8, 4, name="b"))
    groups, _, _ = prune_and_check(model)
    assert {m.node for m in groups[0].members if m.role == "param"} == {"scale", "prelu"}


@pytest.mark.parametrize(
    ("attrs", "index", "prunable"),
    [({}, 1, False), ({}, 0, True), ({}, -3, False), ({"start": 2}, 0, True), ({"start": -3, "end": -1}, 0, False)],
)
def test_shape_read_of_channel_count_freezes(attrs: dict, index: int, prunable: bool) -> None:
    net = Net()
    a = net.conv("x", 3, 8, name="a")
    shape = net.op("Shape", [a], name="shape", **attrs)
    net.inits.append(numpy_helper.from_array(np.array(index, dtype=np.int64), "index"))
    c = net.op("Gather", [shape, "index"], name="read", axis=0)
    model = net.model(net.conv(a, 8, 4, name="b"), c, int_outputs=(c,))
    groups = analyze_groups(model)
    assert groups[0].prunable == prunable, groups[0].reason
    if not prunable:
        assert "reads its channel count" in groups[0].reason, groups[0].reason


def test_ids_are_stable_and_summary_adds_up() -> None:
    net = Net()
    h = net.op("Relu", [net.conv("x", 3, 8, name="c1")])
    model = net.model(net.conv(h, 8, 4, name="c2"))
    assert analyze_groups(model) == analyze_groups(model), "analysis is not deterministic"
    report = group_summary(model)
    assert [r.name for r in report.rows] == ["c1", "c2"]
    assert report.rows[0].prunable and not report.rows[1].prunable
    assert report.prunable_flops_fraction == pytest.approx(1.0), "both convs touch the prunable group"
    assert report.rows[1].flops_share == pytest.approx(report.rows[1].macs / report.total_macs)


def test_registering_a_handler_twice_raises() -> None:
    with pytest.raises(ValueError, match="already has a channel handler"):
        register_handler(("Conv",), lambda a, node, key: None)
