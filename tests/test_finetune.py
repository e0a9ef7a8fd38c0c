"""Fine-tuning: ONNX -> torch -> ONNX round trips exactly, distillation recovers accuracy, bad pairs fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from splinecompress.cli.main import main

from splinecompress.errors import CalibrationDataError, UnsupportedGraphError, UsageError
from splinecompress.finetune import export_like, finetune, onnx_to_torch
from splinecompress.model import input_specs, load_model, output_specs, save_model
from tests.zoo import Net, export_zoo_model

torch = pytest.importorskip("torch")
pytest.importorskip("onnx2torch")

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _assert_same_interface(a: Path, b: Path) -> None:
    model_a, model_b = load_model(a), load_model(b)
    assert input_specs(model_a) == input_specs(model_b), f"{b} changed the inputs of {a}"
    assert [s.name for s in output_specs(model_a)] == [s.name for s in output_specs(model_b)], "output names changed"


@pytest.mark.parametrize("name", ["conv_flatten_gemm", "mnist", "resnet18"])
def test_round_trip_is_identical(name: str, zoo_dir: Path, tmp_path: Path) -> None:
    """Untrained ONNX -> torch -> ONNX gives the same outputs, BatchNormalization nodes included (mnist, resnet18)."""
    path = export_zoo_model(name, zoo_dir)
    module = onnx_to_torch(path)
    weights = sum(p.numel() for p in module.parameters())
    assert weights > 0 and all(p.requires_grad for p in module.parameters()), "weights must be trainable"
    out = tmp_path / "rt.onnx"
    export_like(module, path, out)
    _assert_same_interface(path, out)
    shape = [2 if not isinstance(d, int) else d for d in input_specs(load_model(path))[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for before, after in zip(_run(path, x), _run(out, x), strict=True):
        diff = float(np.max(np.abs(before - after)))
        assert diff <= 1e-6 * max(1.0, float(np.max(np.abs(before)))), f"{name}: round trip differs by {diff}"


@pytest.fixture(scope="module")
def slim_07(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MNIST sample pruned at ratio 0.7 with least-squares repair (the issue's setting)."""
    from splinecompress.compress import compress

    out = tmp_path_factory.mktemp("slim") / "slim.onnx"
    compress(SAMPLES / "mnist_cnn.onnx", SAMPLES / "mnist_calib.npz", out, ratio=0.7, verify=False,
             measure_latency=False, val=SAMPLES / "mnist_val.npz")  # fmt: skip
    return out


def test_finetune_cli_raises_accuracy(slim_07: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ft.onnx"
    report = tmp_path / "ft.json"
    code = main(
        ["finetune", str(slim_07), "--teacher", str(SAMPLES / "mnist_cnn.onnx"), "--data",
         str(SAMPLES / "mnist_train.npz"), "--val", str(SAMPLES / "mnist_val.npz"), "--epochs", "2", "-o", str(out),
         "--json", str(report)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(report.read_text())
    before, after = result["history"][0]["val_accuracy"], result["history"][-1]["val_accuracy"]
    with capsys.disabled():
        print(f"\nMNIST ratio 0.7: val accuracy {before:.2%} without fine-tuning, {after:.2%} after 2 epochs "
              f"({result['train_seconds']:.1f} s; original {result['teacher_val_accuracy']:.2%})")  # fmt: skip
    assert after > before + 0.2, f"fine-tuning must raise val accuracy a lot: {before:.2%} -> {after:.2%}"
    assert "val       accuracy" in printed and "epoch" in printed, printed
    _assert_same_interface(slim_07, out)
    assert input_specs(load_model(out))[0].shape[0] == "batch", "the batch must stay dynamic"
    # The file's accuracy is the one reported: the export is faithful.
    data = np.load(SAMPLES / "mnist_val.npz")
    logits = _run(out, data["input"].astype(np.float32))[0]
    assert abs(float(np.mean(logits.argmax(1) == data["labels"])) - after) < 1e-9, "exported model differs"


def test_finetune_is_deterministic_without_labels(slim_07: Path, tmp_path: Path) -> None:
    """Pure distillation (no labels) with a seed repeats exactly; epochs=0 re-exports the model unchanged."""
    data = np.load(SAMPLES / "mnist_train.npz")
    feeds = [{"input": data["input"][:256]}]
    teacher = SAMPLES / "mnist_cnn.onnx"
    a = finetune(slim_07, teacher, feeds, tmp_path / "a.onnx", epochs=1, seed=3)
    b = finetune(slim_07, teacher, feeds, tmp_path / "b.onnx", epochs=1, seed=3)
    assert not a.labelled and a.history[-1].ce_loss is None, "without labels the loss is distillation only"
    assert a.history == tuple(h.__class__(**{**h.__dict__, "seconds": a.history[i].seconds})
                              for i, h in enumerate(b.history)), "same seed, same losses"  # fmt: skip
    x = data["input"][:8].astype(np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "a.onnx", x)[0], _run(tmp_path / "b.onnx", x)[0])
    finetune(slim_07, teacher, feeds, tmp_path / "same.onnx", epochs=0)
    np.testing.assert_allclose(_run(tmp_path / "same.onnx", x)[0], _run(slim_07, x)[0], atol=1e-5)


def test_compress_with_finetune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = np.load(SAMPLES / "mnist_train.npz")
    train = tmp_path / "train.npz"
    np.savez(train, input=data["input"][:256], labels=data["labels"][:256])
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    code = main(
        ["compress", str(SAMPLES / "mnist_cnn.onnx"), "--calib", str(SAMPLES / "mnist_calib.npz"), "--ratio", "0.7",
         "-o", str(out), "--no-latency", "--val", str(SAMPLES / "mnist_val.npz"), "--finetune-epochs", "1",
         "--train", str(train), "--report", str(report)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr()
    result = json.loads(report.read_text())
    assert result["finetune"]["epochs"] == 1 and result["finetune"]["samples"] == 256, result["finetune"]
    _assert_same_interface(SAMPLES / "mnist_cnn.onnx", out)


def test_compress_finetune_needs_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compress", str(SAMPLES / "mnist_cnn.onnx"), "--calib", str(SAMPLES / "mnist_calib.npz"),
                 "-o", str(tmp_path / "s.onnx"), "--finetune-epochs", "2"])  # fmt: skip
    assert code == 2, "a missing --train is bad usage"
    assert "--train" in capsys.readouterr().err


# -- bad input ----------------------------------------------------------------------------------------------------


def _tiny(
    tmp_path: Path, name: str, *, classes: int = 10, input_name: str = "x", middle: str = "Relu", two: bool = False
) -> Path:
    net = Net(channels=3, size=8)
    y = net.op(middle, [net.conv("x", 3, 4)], name="act")
    y = net.op("Flatten", [net.op("GlobalAveragePool", [y])])
    model = net.model(net.gemm(y, 4, classes), *(["act_out"] if two else []))
    if input_name != "x":
        model.graph.input[0].name = input_name
        for node in model.graph.node:
            node.input[:] = [input_name if i == "x" else i for i in node.input]
    path = tmp_path / f"{name}.onnx"
    save_model(model, path)
    return path


def _tiny_data(tmp_path: Path, *, labels: np.ndarray | None = None) -> Path:
    path = tmp_path / "data.npz"
    arrays = {"x": np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    np.savez(path, **arrays, **({} if labels is None else {"labels": labels}))
    return path


def test_tiny_graph_trains(tmp_path: Path) -> None:
    student, teacher = _tiny(tmp_path, "s"), _tiny(tmp_path, "t")
    result = finetune(student, teacher, _tiny_data(tmp_path), tmp_path / "out.onnx", epochs=2, batch_size=8)
    assert result.history[-1].loss is not None and result.trainable_parameters == 3 * 4 * 9 + 4 + 4 * 10 + 10
    _assert_same_interface(student, tmp_path / "out.onnx")


def test_shared_constants_are_untied(tmp_path: Path) -> None:
    """Exporters store equal constants once, sometimes behind Identity nodes (regnet's BN-folded zero biases);
    each consumer gets its own trainable copy and the round trip stays exact."""
    net = Net(channels=3, size=8)
    bias = net.const(np.zeros(4))
    shared = net.op("Identity", [bias])
    w = [net.const(net.rng.standard_normal((4, c, 3, 3)) * 0.3) for c in (3, 4, 4)]
    y = net.op("Relu", [net.op("Conv", ["x", w[0], shared], pads=[1] * 4)])
    y = net.op("Relu", [net.op("Conv", [y, w[1], shared], pads=[1] * 4)])
    y = net.op("Conv", [y, w[2], bias], pads=[1] * 4)
    path = tmp_path / "shared.onnx"
    save_model(net.model(y), path)
    module = onnx_to_torch(path)
    assert sum(p.numel() for p in module.parameters()) == 3 * 4 * 9 + 2 * 4 * 4 * 9 + 3 * 4, "three own biases"
    export_like(module, path, tmp_path / "rt.onnx")
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "rt.onnx", x)[0], _run(path, x)[0], atol=1e-6)


def test_matmul_weights_train(tmp_path: Path) -> None:
    """onnx2torch keeps MatMul weights and Add biases as buffers; they are promoted to parameters."""
    net = Net(channels=3, size=8)
    y = net.op("Flatten", [net.op("GlobalAveragePool", [net.op("Relu", [net.conv("x", 3, 4)])])])
    y = net.op("Add", [net.op("MatMul", [y, net.const(net.rng.standard_normal((4, 10)))]), net.const(np.ones(10))])
    path = tmp_path / "matmul.onnx"
    save_model(net.model(y), path)
    module = onnx_to_torch(path)
    assert sum(p.numel() for p in module.parameters()) == 3 * 4 * 9 + 4 + 4 * 10 + 10, "MatMul/Add weights train"
    export_like(module, path, tmp_path / "rt.onnx")
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "rt.onnx", x)[0], _run(path, x)[0], atol=1e-6)


def test_fixed_batch_stays_fixed(tmp_path: Path) -> None:
    paths = []
    for name in ("s", "t"):
        model = load_model(_tiny(tmp_path, name), infer=False)
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
        paths.append(tmp_path / f"{name}4.onnx")
        save_model(model, paths[-1])
    result = finetune(*paths, _tiny_data(tmp_path), tmp_path / "out.onnx", epochs=1, batch_size=8)
    assert result.batch_size == 4, "a fixed batch overrides the batch size"
    assert input_specs(load_model(tmp_path / "out.onnx"))[0].shape == (4, 3, 8, 8), "the batch must stay fixed"


def test_teacher_with_other_input_names(tmp_path: Path) -> None:
    student, teacher = _tiny(tmp_path, "s"), _tiny(tmp_path, "t", input_name="image")
    with pytest.raises(UsageError, match=r"teacher .* takes input\(s\) \['image'\] but student .* takes \['x'\]"):
        finetune(student, teacher, _tiny_data(tmp_path), tmp_path / "out.onnx", epochs=1)


def test_teacher_with_other_input_shape(tmp_path: Path, zoo_dir: Path) -> None:
    resnet = export_zoo_model("resnet18", zoo_dir)  # input 'input' too, but 3x64x64
    slim = SAMPLES / "mnist_cnn.onnx"
    with pytest.raises(UsageError, match=r"input 'input' has shape batchx3x64x64 but student .* batchx1x28x28"):
        finetune(slim, resnet, SAMPLES / "mnist_calib.npz", tmp_path / "out.onnx", epochs=1)


def test_teacher_with_other_outputs(tmp_path: Path) -> None:
    student, teacher = _tiny(tmp_path, "s"), _tiny(tmp_path, "t", classes=5)
    with pytest.raises(UsageError, match=r"student output 'gemm5_out' has shape batchx10 but teacher .* batchx5"):
        finetune(student, teacher, _tiny_data(tmp_path), tmp_path / "out.onnx", epochs=1)
    two = _tiny(tmp_path, "t2", two=True)
    with pytest.raises(UsageError, match=r"has 2 output\(s\) .* has 1 .* counts must match"):
        finetune(student, two, _tiny_data(tmp_path), tmp_path / "out.onnx", epochs=1)


def test_unsupported_op_names_node(tmp_path: Path) -> None:
    student = _tiny(tmp_path, "s", middle="Shrink")
    with pytest.raises(UnsupportedGraphError, match=r"node 'act' \(ai.onnx Shrink, opset 17\) cannot be turned into"):
        onnx_to_torch(student)


def test_bad_labels_and_settings(tmp_path: Path) -> None:
    student, teacher = _tiny(tmp_path, "s"), _tiny(tmp_path, "t")
    data = _tiny_data(tmp_path, labels=np.full(16, 12, dtype=np.int64))
    with pytest.raises(CalibrationDataError, match=r"labels range 12\.\.12 but the model has 10 classes"):
        finetune(student, teacher, data, tmp_path / "out.onnx", epochs=1)
    with pytest.raises(UsageError, match=r"alpha 2 is out of range"):
        finetune(student, teacher, data, tmp_path / "out.onnx", alpha=2)
    assert not (tmp_path / "out.onnx").exists(), "nothing is written on bad input"


def test_cli_teacher_mismatch_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    student, teacher = _tiny(tmp_path, "s"), _tiny(tmp_path, "t", input_name="image")
    code = main(["finetune", str(student), "--teacher", str(teacher), "--data", str(_tiny_data(tmp_path)),
                 "-o", str(tmp_path / "o.onnx")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "input names must match" in err[0], err
