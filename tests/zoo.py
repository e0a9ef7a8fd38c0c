"""Test models: the zoo of real architectures exported by our exporter, and a tiny ONNX graph builder.

Each entry builds a torch module with random weights (seeded) and names the input shape it is exported with.
Small inputs keep the tests fast; vgg11_bn needs 224x224 because its adaptive 7x7 pooling only exports when the
feature map divides evenly (its 102M-parameter classifier is the same size at any input).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from splinecompress.model import infer_shapes

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: a factory returning a torch module, its export input shape and export options."""

    name: str
    factory: Callable[[], object]
    input_shape: tuple[int, ...]
    keep_batchnorm: bool = False
    # False leaves BatchNorm at its default init: identical BN parameters (and the zero biases BN folding gives)
    # are then shared between nodes by the exporter, which exercises copy-on-write slicing.
    randomize_batchnorm: bool = True
    # the benchmark exports these at 224x224; the others have a fixed input size
    resizable: bool = True


def _torchvision(name: str, **kwargs) -> Callable[[], object]:
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


def _mnist():
    from samples.mnist_net import build_mnist_net

    return build_mnist_net()


def _conv_flatten_gemm():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, stride=2, padding=1),
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(24 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("conv_flatten_gemm", _conv_flatten_gemm, (1, 3, 16, 16), resizable=False),
        ZooEntry("mnist", _mnist, (1, 1, 28, 28), keep_batchnorm=True, randomize_batchnorm=False,
                 resizable=False),
        ZooEntry("resnet18", _torchvision("resnet18"), (1, 3, 64, 64), keep_batchnorm=True),
        ZooEntry("resnet50", _torchvision("resnet50"), (1, 3, 64, 64)),
        ZooEntry("resnext50_32x4d", _torchvision("resnext50_32x4d"), (1, 3, 64, 64)),
        ZooEntry("vgg11_bn", _torchvision("vgg11_bn"), (1, 3, 224, 224)),
        ZooEntry("mobilenet_v2", _torchvision("mobilenet_v2"), (1, 3, 64, 64)),
        ZooEntry("mobilenet_v3_small", _torchvision("mobilenet_v3_small"), (1, 3, 64, 64)),
        ZooEntry("densenet121", _torchvision("densenet121"), (1, 3, 64, 64)),
        ZooEntry("efficientnet_b0", _torchvision("efficientnet_b0"), (1, 3, 64, 64)),
        ZooEntry("regnet_x_400mf", _torchvision("regnet_x_400mf"), (1, 3, 64, 64), randomize_batchnorm=False),
        ZooEntry("squeezenet1_1", _torchvision("squeezenet1_1"), (1, 3, 64, 64)),
        ZooEntry("googlenet", _torchvision("googlenet", init_weights=True), (1, 3, 64, 64)),
    )
}


def randomize_weights(module, seed: int = 0, *, batchnorm: bool = True) -> None:
    """Re-draw every weight so that activations keep their scale through deep nets (torchvision's own inits let
    some outputs vanish to ~1e-14, which would make any equivalence check pass vacuously) and BatchNorm layers
    are far from identity (non-zero shifts that leak through ReLU, non-unit scales).
    """
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
            elif isinstance(m, nn.BatchNorm2d) and batchnorm:
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)


def export_zoo_model(name: str, folder: str | os.PathLike[str], *, input_shape: tuple[int, ...] | None = None,
                     seed: int = 0, dynamo: bool = False) -> Path:
    """Export zoo model ``name`` with random weights (seeded) into ``folder``; reuse the file if it is there.

    Args:
        name: a key of ZOO.
        folder: where ``<name>.onnx`` goes.
        input_shape: override the entry's export shape (the benchmark uses 224x224).
        seed: torch seed for the random weights.
        dynamo: use torch's dynamo exporter (opset 18; unoptimised graphs where BatchNorm is kept).

    Returns:
        The path of the exported model.
    """
    import torch

    from splinecompress.export import export_model

    entry = ZOO[name]
    shape = input_shape or entry.input_shape
    path = Path(folder) / f"{name}_{'x'.join(map(str, shape))}{'_dynamo' if dynamo else ''}.onnx"
    if path.exists():
        return path
    torch.manual_seed(seed)
    module = entry.factory()
    randomize_weights(module, seed, batchnorm=entry.randomize_batchnorm)
    export_model(module, path, shape, keep_batchnorm=entry.keep_batchnorm, dynamo=dynamo)
    return path


class Net:
    """A tiny ONNX graph builder: NCHW float input 'x', random weights, named nodes."""

    def __init__(self, channels: int = 3, size: int = 8, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, size, size])
        self.count = 0

    def const(self, value: np.ndarray, name: str | None = None) -> str:
        name = name or f"w{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        self.count += 1
        name = name or f"{op_type.lower()}{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, name: str | None = None,
             bias: bool = True) -> str:
        w = self.const(self.rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin * k * k / group))
        inputs = [x, w] + ([self.const(self.rng.standard_normal(cout) * 0.1)] if bias else [])
        return self.op("Conv", inputs, name, pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.standard_normal(c) * 0.2, r.standard_normal(c) * 0.2,
                  r.uniform(0.5, 1.5, c)]
        return self.op("BatchNormalization", [x, *(self.const(p) for p in params)])

    def gemm(self, x: str, k: int, n: int, name: str | None = None) -> str:
        w = self.const(self.rng.standard_normal((n, k)) / np.sqrt(k))
        return self.op("Gemm", [x, w, self.const(self.rng.standard_normal(n) * 0.1)], name, transB=1)

    def model(self, *outputs: str, int_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(o, TensorProto.INT64 if o in int_outputs else TensorProto.FLOAT, None)
                for o in outputs]
        graph = helper.make_graph(self.nodes, "tiny", [self.input], outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return infer_shapes(model)
