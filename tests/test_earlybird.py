"""Early-Bird detection: the rule on a real (tiny) training run, codes equal to the ONNX calibration path,
packed distances equal to unpacked ones, clear errors, the EB-tickets baseline, and the 2-D partition sample."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from splinecompress.earlybird import (  # noqa: E402
    MaskEarlyBird,
    PackedBits,
    SplineEarlyBird,
    gamma_masks,
    hamming_packed,
)
from splinecompress.errors import UsageError  # noqa: E402


def x_data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = np.random.default_rng(seed)
    x = gen.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    y = (np.abs(x[:, 1]) < np.abs(x[:, 0])).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(inplace=True), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


@pytest.fixture(scope="module")
def trained_run() -> tuple[SplineEarlyBird, list]:
    """20 epochs of a seeded MLP on X data with a decaying learning rate, the detector updated after each."""
    torch.manual_seed(0)
    x, y = x_data()
    net = mlp()
    detector = SplineEarlyBird(net, x[:128])
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    steps = []
    for _ in range(20):
        net.train()
        for i in range(0, len(x), 64):
            loss = nn.functional.cross_entropy(net(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        steps.append(detector.update())
    return detector, steps


def test_distances_shrink_and_ticket_is_drawn(trained_run) -> None:
    detector, steps = trained_run
    consecutive = [s.distances[0] for s in steps[1:]]
    early, late = np.mean(consecutive[:3]), np.mean(consecutive[-3:])
    assert late < early / 2, f"consecutive distances should shrink: {np.round(consecutive, 4)}"
    assert detector.ticket_epoch is not None, f"no ticket drawn: {[round(s.max_distance, 4) for s in steps]}"
    first = next(s for s in steps if s.ticket)
    assert first.epoch == detector.ticket_epoch, "ticket_epoch is the first epoch where the rule holds"
    assert len(first.distances) == 3 and first.max_distance < 0.16, f"rule: 3 distances below 0.16, got {first}"
    assert all(not s.ticket for s in steps[:3]), "no ticket before 3 earlier epochs exist"
    assert steps[-1].ticket_epoch == detector.ticket_epoch, "the ticket epoch stays fixed once drawn"
    assert detector.epochs == tuple(range(1, 21)), f"default epoch labels count from 1: {detector.epochs}"


def test_distance_matrix_is_symmetric_and_matches_steps(trained_run) -> None:
    detector, steps = trained_run
    matrix = detector.distance_matrix()
    assert matrix.shape == (20, 20), f"one row per update, got {matrix.shape}"
    np.testing.assert_allclose(matrix, matrix.T, err_msg="distance matrix must be symmetric")
    assert np.all(np.diag(matrix) == 0), "zero diagonal"
    for i, step in enumerate(steps):
        expected = [matrix[i, i - k] for k in range(1, len(step.distances) + 1)]
        np.testing.assert_allclose(step.distances, expected, err_msg=f"step {i} distances are matrix row {i}")


def test_packed_distances_equal_unpacked(trained_run) -> None:
    detector, _ = trained_run
    a, b = detector.codes(0), detector.codes(1)
    assert set(a) == {"1", "3"}, f"codes are read at the two ReLU modules, got {sorted(a)}"
    unpacked = np.mean([np.mean(a[name] != b[name]) for name in a])
    assert detector.distance_matrix()[1, 0] == pytest.approx(unpacked, abs=1e-12), "matrix entry from packed bits"
    rng = np.random.default_rng(1)
    for shape in [(13,), (3, 7, 5), (64, 8), (1,)]:  # sizes that are and are not multiples of 8
        p, q = rng.random(shape) > 0.5, rng.random(shape) > 0.3
        pp, pq = PackedBits.pack(p), PackedBits.pack(q)
        assert pp.data.nbytes == (p.size + 7) // 8, "one bit per code"
        assert np.array_equal(pp.unpack(), p), f"pack/unpack round trip for shape {shape}"
        assert hamming_packed(pp, pq) == pytest.approx(np.mean(p != q), abs=1e-12), f"shape {shape}"


def test_codes_match_onnx_calibration(tmp_path: Path) -> None:
    from splinecompress.calib.calibrate import calibrate
    from splinecompress.export import export_model
    from splinecompress.graph.groups import analyze_groups
    from splinecompress.model import load_model

    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(6 * 6 * 6, 12), nn.ReLU(), nn.Linear(12, 3)
    )
    probe = torch.randn(16, 1, 8, 8)
    detector = SplineEarlyBird(net, probe)
    detector.update()
    counts = detector.on_counts()

    export_model(net, tmp_path / "net.onnx", (1, 1, 8, 8))
    model = load_model(tmp_path / "net.onnx")
    groups = analyze_groups(model)
    stats = calibrate(model, groups, [{"input": probe.numpy()}], device="cpu")
    matched = 0
    for group in groups.prunable():
        # The probe's activation node is named after the torch module: "/1/Relu" <- module "1".
        layer = group.probe_slices[0].node.strip("/").split("/")[0]
        assert layer in counts, f"{group.label}: no torch codes for layer {layer} (have {sorted(counts)})"
        np.testing.assert_array_equal(
            counts[layer], stats[group.id].on_counts, err_msg=f"{group.label}: on-counts differ from calibrate()"
        )
        assert stats[group.id].positions == detector.codes()[layer][:, 0].size, f"{group.label}: positions"
        matched += 1
    assert matched == 2, f"both hidden layers (conv and linear) are compared, got {matched}"


def test_update_restores_modes_and_reads_inputs_of_inplace_relu() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(8, 2))
    net.train()
    net[3].eval()  # a submodule deliberately left in eval mode must stay so
    probe = torch.randn(10, 4)
    detector = SplineEarlyBird(net, probe)
    detector.update()
    assert net.training and net[1].training, "train mode restored"
    assert not net[3].training, "a submodule's own eval mode is restored too"
    net.eval()
    with torch.no_grad():
        expected = (net[1](net[0](probe)) > 0).numpy()  # pre-activation sign, in eval mode
    assert np.array_equal(detector.codes()["2"], expected), "codes are the sign of the ReLU input, not its output"
    assert not net.training, "eval mode restored"


def test_shared_activation_module_gives_one_layer_per_call() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.relu = nn.Linear(2, 3), nn.Linear(3, 3), nn.ReLU()

        def forward(self, x):
            return self.relu(self.b(self.relu(self.a(x))))

    detector = SplineEarlyBird(Shared(), torch.randn(5, 2))
    detector.update()
    assert sorted(detector.codes()) == ["relu", "relu#1"], f"got {sorted(detector.codes())}"


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return torch.relu(self.fc(x))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SplineEarlyBird(nn.Linear(3, 2), torch.randn(4, 3)), "no activation layers found in Linear"),
        (lambda: SplineEarlyBird(Functional(), torch.randn(4, 3)), "functional activations"),
        (lambda: SplineEarlyBird(mlp(), torch.randn(4, 2), lookback=0), "lookback 0 must be an integer of at least 1"),
        (lambda: SplineEarlyBird(mlp(), torch.randn(4, 2), threshold=0.0), r"threshold 0.0 must lie in \(0, 1\)"),
        (lambda: SplineEarlyBird(mlp(), torch.randn(4, 2), threshold=1.5), r"threshold 1.5 must lie in \(0, 1\)"),
        (lambda: SplineEarlyBird(mlp(), torch.randn(4, 2), layers=["nope"]), r"layers \['nope'\] are not modules"),
        (lambda: MaskEarlyBird(mlp()), "no BatchNorm2d module"),
        (lambda: MaskEarlyBird(bn_net(), ratio=1.0), r"ratio 1.0 must lie in \[0, 1\)"),
        (lambda: MaskEarlyBird(bn_net(), scope="net"), "scope 'net' is not one of global, layer"),
    ],
)
def test_bad_arguments_raise_usage_error(make, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        make()


def test_probe_batch_of_wrong_shape_is_one_line_error() -> None:
    net = mlp()
    net.train()
    detector = SplineEarlyBird(net, torch.randn(5, 3))
    with pytest.raises(UsageError, match=r"cannot run on the probe batch of shape \(5, 3\)") as info:
        detector.update()
    assert "\n" not in str(info.value), f"one line: {info.value!s}"
    assert net.training, "the model's mode is restored even when the forward pass fails"
    assert detector.epochs == (), "a failed update records nothing"


def bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2),
    )  # fmt: skip


def test_mask_rule_on_bn_net(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = bn_net()
    x = torch.randn(64, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    eb = MaskEarlyBird(net, ratio=0.5)
    spline = SplineEarlyBird(net, x[:16])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    steps = []
    for _ in range(8):
        net.train()
        for i in range(0, 64, 16):
            # network slimming's L1 push on gamma makes the masks move and then settle
            loss = nn.functional.cross_entropy(net(x[i : i + 16]), y[i : i + 16])
            loss = loss + 1e-3 * sum(m.weight.abs().sum() for m in net.modules() if isinstance(m, nn.BatchNorm2d))
            opt.zero_grad()
            loss.backward()
            opt.step()
        steps.append(eb.update())
        spline.update()
    series = [s.distances[0] for s in steps[1:]]
    assert len(series) == 7 and all(0.0 <= d <= 1.0 for d in series), f"mask distance series: {series}"
    assert all(len(s.distances) <= 4 for s in steps), "the baseline compares with the previous 4 masks"
    assert all(not s.ticket for s in steps[:4]), "no ticket before 5 masks exist"
    masks = eb.masks()
    assert sorted(masks) == ["1", "4"], f"one mask per BatchNorm2d, got {sorted(masks)}"
    assert sum(int(m.sum()) for m in masks.values()) == 12, "global scope keeps the top half of 24 channels"
    per_layer = gamma_masks(net, 0.5, scope="layer")
    assert [int(m.sum()) for m in per_layer.values()] == [4, 8], "layer scope keeps half of each layer"
    assert eb.distance_matrix().shape == (8, 8)
    png = eb.save_heatmap(tmp_path / "eb.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "a PNG file"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (8 * 24 + 3 * 24, 8 * 24), f"8x8 cells of 24 px plus a colour bar: {width}x{height}"
    assert spline.save_heatmap(tmp_path / "spline.png").is_file()


def test_heatmap_needs_a_record(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no epoch recorded yet"):
        SplineEarlyBird(mlp(), torch.randn(4, 2)).save_heatmap(tmp_path / "x.png")


def test_import_does_not_import_torch() -> None:
    code = "import sys, splinecompress.earlybird; assert 'torch' not in sys.modules, 'torch imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_partition_2d_sample_runs_small(tmp_path: Path) -> None:
    from samples.partition_2d import run

    result = run(tmp_path, points=400, epochs=150, ratios=(0.5,))
    png = Path(result["png"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the picture is written"
    assert result["kept"] == {0.0: 20, 0.5: 10}, f"half the hidden units removed: {result['kept']}"
    assert result["accuracy"][0.0] > 0.8, f"the dense toy learns the X: {result['accuracy']}"
    assert 0.0 <= result["accuracy"][0.5] <= 1.0
