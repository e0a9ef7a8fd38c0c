"""The exporter: parity with torch on real architectures, BatchNorm kept on request, bad modules refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from samples.mnist_net import build_mnist_net  # noqa: E402
from splinecompress.errors import ExportError, UsageError  # noqa: E402
from splinecompress.export import build_module, export_model  # noqa: E402
from splinecompress.model import describe_model, load_model  # noqa: E402


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_sample_architecture_parity(tmp_path: Path, dynamo: bool) -> None:
    torch.manual_seed(0)
    net = build_mnist_net().eval()
    path = tmp_path / "mnist.onnx"
    result = export_model(net, path, (1, 1, 28, 28), dynamic_batch=True, dynamo=dynamo)
    assert result.exporter == ("dynamo" if dynamo else "legacy")
    assert result.max_abs_diff <= result.tolerance
    assert result.batchnorm_nodes == 0, "eval export folds BatchNorm into Conv by default"

    # The exported file itself, run at a batch size other than the one exported, matches torch.
    x = np.random.default_rng(3).standard_normal((5, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_onnx(path, x), expected, rtol=1e-4, atol=1e-4)
    info = describe_model(load_model(path))
    assert info.inputs[0].shape == ("batch", 1, 28, 28)
    assert info.outputs[0].shape == ("batch", 10)


def test_resnet18_parity_static_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    path = tmp_path / "resnet18.onnx"
    result = export_model(net, path, (1, 3, 64, 64), dynamic_batch=False, opset=17, output_names=("output",))
    assert result.opset == 17
    assert result.max_abs_diff <= result.tolerance
    info = describe_model(load_model(path))
    assert info.inputs[0].shape == (1, 3, 64, 64)
    assert info.op_counts["Conv"] == 20
    assert "BatchNormalization" not in info.op_counts


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_keep_batchnorm(tmp_path: Path, dynamo: bool) -> None:
    torch.manual_seed(0)
    net = build_mnist_net()
    # Non-trivial running statistics, so a wrongly folded or wrongly kept BN would show in the parity check.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    result = export_model(net, tmp_path / "bn.onnx", (1, 1, 28, 28), keep_batchnorm=True, dynamo=dynamo)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert result.batchnorm_nodes == n_bn == 9


class _TraceTimeConstant(torch.nn.Module):
    """Multiplies by how many times forward ran: the traced graph bakes in 1, later torch calls differ."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x):
        self.calls += 1
        return self.linear(x) * float(self.calls)


def test_parity_failure_refuses_export(tmp_path: Path) -> None:
    target = tmp_path / "unfaithful.onnx"
    with pytest.raises(ExportError, match="differs from torch"):
        export_model(_TraceTimeConstant(), target, (1, 4), dynamic_batch=False)
    assert not target.exists(), "an export that fails parity must not leave a file"


def test_input_shape_checked(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="positive"):
        export_model(build_mnist_net(), tmp_path / "x.onnx", (1, 0, 28, 28))
    with pytest.raises(UsageError, match=r"opset 3 is out of range"):
        export_model(build_mnist_net(), tmp_path / "x.onnx", (1, 1, 28, 28), opset=3)


def test_wrong_input_rank_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"torch\.onnx\.export"):
        export_model(build_mnist_net(), tmp_path / "x.onnx", (1, 28, 28, 3, 3))


def test_build_module_from_spec_and_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo_root: Path) -> None:
    monkeypatch.chdir(repo_root)
    torch.manual_seed(1)
    trained = build_mnist_net()
    weights = tmp_path / "state.pt"
    torch.save(trained.state_dict(), weights)
    net = build_module("samples.mnist_net:build_mnist_net", weights)
    for (name, a), b in zip(trained.state_dict().items(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"weight {name} not loaded"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("samples.mnist_net", "must look like MODULE:FACTORY"),
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        ("samples.mnist_net:no_such_factory", "has no callable 'no_such_factory'"),
        ("samples.mnist_net:input_shape", "not a torch.nn.Module"),
    ],
)
def test_build_module_errors(spec: str, message: str, monkeypatch: pytest.MonkeyPatch, repo_root: Path) -> None:
    monkeypatch.chdir(repo_root)
    with pytest.raises(UsageError, match=message):
        build_module(spec)


def test_weights_that_do_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo_root: Path) -> None:
    monkeypatch.chdir(repo_root)
    weights = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), weights)
    with pytest.raises(ExportError, match="does not fit the model"):
        build_module("samples.mnist_net:build_mnist_net", weights)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a pickle")
    with pytest.raises(ExportError, match="cannot be read"):
        build_module("samples.mnist_net:build_mnist_net", garbage)
