"""Parameters and MACs per node and in total, checked against hand-computed values."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from splinecompress.graph.cost import model_cost
from splinecompress.model import infer_shapes
from tests.zoo import Net


def test_conv_depthwise_gemm_macs_and_params() -> None:
    net = Net(channels=3, size=8)
    a = net.conv("x", 3, 8, name="a")  # 8x8 out, 8 channels, 3*3*3 per output
    d = net.conv(a, 8, 8, group=8, name="dw")  # 3*3 per output
    p = net.op("Flatten", [net.op("GlobalAveragePool", [d])])
    model = net.model(net.gemm(p, 8, 5, name="fc"))
    cost = model_cost(model).by_node()
    assert cost["a"].macs == 8 * 8 * 8 * 27 and cost["a"].params == 8 * 27 + 8, cost["a"]
    assert cost["dw"].macs == 8 * 8 * 8 * 9 and cost["dw"].params == 8 * 9 + 8, cost["dw"]
    assert cost["fc"].macs == 8 * 5 and cost["fc"].params == 8 * 5 + 5, cost["fc"]
    total = model_cost(model)
    assert total.macs == sum(c.macs for c in cost.values()) and total.complete
    assert total.params == 8 * 27 + 8 + 8 * 9 + 8 + 45, total.params


def test_matmul_and_batch_size() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6])
    w = numpy_helper.from_array(np.ones((6, 10), np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model = infer_shapes(model)
    assert model_cost(model).macs == 4 * 10 * 6
    assert model_cost(model, batch=3).macs == 3 * 4 * 10 * 6


def test_shared_weights_count_once() -> None:
    net = Net()
    w = net.const(np.ones((4, 3, 3, 3)), "shared")
    a = net.op("Conv", ["x", w], "a", pads=[1] * 4)
    b = net.op("Conv", ["x", w], "b", pads=[1] * 4)
    cost = model_cost(net.model(net.op("Add", [a, b])))
    assert cost.params == 4 * 27, "a weight shared by two nodes is one set of parameters"
    assert sum(n.params for n in cost.nodes) == 2 * 4 * 27
