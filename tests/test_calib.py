"""Calibration: codes as torch sees them, exact co-activation counts, mergeable shards, flat memory, bad data."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from splinecompress.calib.calibrate import calibrate
from splinecompress.calib.data import CalibrationData
from splinecompress.calib.runner import create_session, expose_tensors
from splinecompress.calib.stats import SplineStats
from splinecompress.errors import CalibrationDataError, UsageError
from splinecompress.graph.groups import analyze_groups
from splinecompress.model import input_specs, load_model

torch = pytest.importorskip("torch")

from samples.mnist_net import build_mnist_net  # noqa: E402
from splinecompress.export import export_model  # noqa: E402


@pytest.fixture(scope="module")
def random_net(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """The sample architecture with random weights and non-trivial BatchNorm statistics, exported."""
    torch.manual_seed(0)
    net = build_mnist_net().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.3, 0.3)
    path = tmp_path_factory.mktemp("calib") / "net.onnx"
    export_model(net, path, (1, 1, 28, 28), dynamic_batch=True)
    return net, path


@pytest.fixture(scope="module")
def calib_inputs(sample_calib: Path) -> np.ndarray:
    return np.load(sample_calib)["input"][:96]


def torch_relu_inputs(net: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """The input of every ReLU module, captured before the (in-place) ReLU runs."""
    captured: dict[str, np.ndarray] = {}
    handles = []
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.ReLU):

            def hook(mod, args, name=name):
                captured[name] = args[0].detach().clone().numpy()

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        net(torch.from_numpy(x))
    for h in handles:
        h.remove()
    return captured


def codes_stats(values: list[np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """Positions, on-counts and B^T B of channel codes, computed directly from NCHW tensors."""
    bits = np.concatenate([np.moveaxis(v, 1, -1).reshape(-1, v.shape[1]) > 0 for v in values])
    b = bits.astype(np.int64)
    return len(bits), b.sum(axis=0), b.T @ b


def test_codes_match_torch_relu_inputs(random_net, calib_inputs: np.ndarray) -> None:
    net, path = random_net
    model = load_model(path)
    groups = analyze_groups(model)
    stats = calibrate(model, groups, [{"input": calib_inputs}], batch_size=40)
    relu_inputs = torch_relu_inputs(net, calib_inputs)
    # Each probe-bearing group of the sample maps onto the ReLUs of the torch module by position in the network.
    by_group = {
        1: ["stages.0.relu1"],
        2: ["stages.1.relu1"],
        4: ["stages.2.relu1"],
        0: ["stem.2", "stages.0.relu2"],
        3: ["stages.1.relu2"],
        5: ["stages.2.relu2"],
    }
    for gid, relus in by_group.items():
        positions, on_counts, coactive = codes_stats([relu_inputs[r] for r in relus])
        got = stats[gid]
        assert got.positions == positions, f"group {gid}: positions"
        # Float kernels differ (folded BN in ONNX): allow a sign flip on a handful of near-zero positions.
        flips = np.abs(got.on_counts - on_counts).max()
        assert flips <= 2, f"group {gid}: on-counts differ from torch by up to {flips}"
        assert np.abs(got.coactive - coactive).max() <= 2
        assert 0 < got.on_counts.mean() < positions, f"group {gid}: codes should vary on real data"


def test_counts_equal_direct_numpy(sample_model: Path, calib_inputs: np.ndarray) -> None:
    model = load_model(sample_model)
    groups = analyze_groups(model)
    stats = calibrate(model, groups, [{"input": calib_inputs}], batch_size=17)  # odd size: batches cut chunks
    session = create_session(expose_tensors(model, [t for g in groups for t in g.probes]), optimize=False)
    for gid, group_stats in stats.groups.items():
        probes = groups[gid].probes
        values = session.run({"input": calib_inputs}, probes)
        positions, on_counts, coactive = codes_stats(values)
        assert group_stats.positions == positions
        np.testing.assert_array_equal(group_stats.on_counts, on_counts)
        np.testing.assert_array_equal(group_stats.coactive, coactive)
        relu_mass = sum(np.maximum(v, 0).sum(axis=(0, 2, 3), dtype=np.float64) for v in values)
        np.testing.assert_allclose(group_stats.active_sums, relu_mass, rtol=1e-6)
        # Hamming distances from G agree with distances of the raw bit vectors.
        bits = np.concatenate([np.moveaxis(v, 1, -1).reshape(-1, v.shape[1]) > 0 for v in values])
        direct = np.mean(bits[:, 0:1] != bits[:, 1:4], axis=0)
        np.testing.assert_allclose(group_stats.hamming()[0, 1:4], direct, rtol=1e-12)


def test_sink_sums_are_channel_means(sample_model: Path, calib_inputs: np.ndarray) -> None:
    model = load_model(sample_model)
    groups = analyze_groups(model)
    stats = calibrate(model, groups, [{"input": calib_inputs}], batch_size=32)
    group = groups[1]
    (tensor,) = {m.tensor for m in group.sink_inputs}
    (value,) = create_session(expose_tensors(model, [tensor]), optimize=False).run({"input": calib_inputs}, [tensor])
    sums = stats[1].sink_sums[tensor]
    assert sums.rows == value.shape[0] * value.shape[2] * value.shape[3]
    np.testing.assert_allclose(sums.sums[:, 0] / sums.rows, value.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-7)


def test_merge_of_shards_equals_one_pass(sample_model: Path, calib_inputs: np.ndarray, tmp_path: Path) -> None:
    model = load_model(sample_model)
    groups = analyze_groups(model)
    whole = calibrate(model, groups, [{"input": calib_inputs}])
    first = calibrate(model, groups, [{"input": calib_inputs[:30]}])
    second = calibrate(model, groups, [{"input": calib_inputs[30:]}])
    merged = first.merge(second)
    # Through a save/load round trip, too.
    merged = SplineStats.load(merged.save(tmp_path / "merged.npz"))
    assert merged.samples == whole.samples == len(calib_inputs)
    for gid, g in whole.groups.items():
        m = merged.groups[gid]
        assert m.positions == g.positions
        np.testing.assert_array_equal(m.on_counts, g.on_counts)
        np.testing.assert_array_equal(m.coactive, g.coactive)
        np.testing.assert_allclose(m.active_sums, g.active_sums, rtol=1e-9)
        for tensor, s in g.sink_sums.items():
            assert m.sink_sums[tensor].rows == s.rows
            np.testing.assert_allclose(m.sink_sums[tensor].sums, s.sums, rtol=1e-9)


def test_merge_refuses_other_model(sample_model: Path, calib_inputs: np.ndarray, random_net) -> None:
    a_model = load_model(sample_model)
    b_model = load_model(random_net[1])
    a = calibrate(a_model, analyze_groups(a_model), [{"input": calib_inputs[:8]}])
    b = calibrate(b_model, analyze_groups(b_model), [{"input": calib_inputs[:8]}])
    with pytest.raises(CalibrationDataError, match="cannot merge statistics of model"):
        a.merge(b)


def test_max_positions_subsamples(sample_model: Path, calib_inputs: np.ndarray) -> None:
    model = load_model(sample_model)
    groups = analyze_groups(model)
    stats = calibrate(model, groups, [{"input": calib_inputs}], batch_size=32, max_positions=1000)
    # 3 batches (32, 32, 32); group 0 has two probe tensors, group 1 one: at most 1000 rows each per batch.
    assert stats[0].positions == 3 * 2 * 1000
    assert stats[1].positions == 3 * 1000
    full = calibrate(model, groups, [{"input": calib_inputs}], batch_size=32)
    # A random subsample estimates the on-fraction well.
    assert np.abs(stats[1].on_fraction() - full[1].on_fraction()).max() < 0.08


def test_fixed_batch_model_gets_exact_batches(random_net, calib_inputs: np.ndarray, tmp_path: Path) -> None:
    net, _ = random_net
    path = tmp_path / "fixed.onnx"
    export_model(net, path, (8, 1, 28, 28), dynamic_batch=False)
    model = load_model(path)
    data = CalibrationData([{"input": calib_inputs[:21]}], input_specs(model), batch_size=5)
    batches = list(data)
    assert [b.feeds["input"].shape[0] for b in batches] == [8, 8, 8]
    assert [b.valid for b in batches] == [8, 8, 5]
    stats = calibrate(model, analyze_groups(model), data)
    assert stats.samples == 21 and stats[1].positions == 21 * 28 * 28, "padding rows must not be counted"


def test_reader_and_folder_sources(sample_model: Path, calib_inputs: np.ndarray, tmp_path: Path) -> None:
    model = load_model(sample_model)
    groups = analyze_groups(model)

    class Reader:  # the onnxruntime CalibrationDataReader protocol
        def __init__(self) -> None:
            self.items = iter([{"input": calib_inputs[i : i + 10]} for i in range(0, 40, 10)])

        def get_next(self):
            return next(self.items, None)

    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", images=calib_inputs[:25])
    np.save(folder / "b.npy", calib_inputs[25:40])
    from_reader = calibrate(model, groups, Reader())
    from_folder = calibrate(model, groups, folder)
    direct = calibrate(model, groups, [{"input": calib_inputs[:40]}])
    for stats in (from_reader, from_folder):
        assert stats.samples == 40
        np.testing.assert_array_equal(stats[3].coactive, direct[3].coactive)


# -- bad input ----------------------------------------------------------------------------------------------------


def specs(sample_model: Path):
    return input_specs(load_model(sample_model))


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"input": np.zeros((4, 1, 28, 28), np.float64)}, "has dtype float64, the model expects float32"),
        ({"input": np.zeros((4, 1, 32, 32), np.float32)}, r"dimension 2 is 32, must be 28"),
        ({"input": np.zeros((4, 28, 28), np.float32)}, r"rank 3"),
        ({"image": np.zeros((4, 1, 28, 28), np.float32), "extra": np.zeros(4)}, "no array for model input"),
        ({"input": np.zeros((4, 1, 28, 28), np.float32), "labels": np.zeros(3, np.int64)}, "one label per sample"),
        ({"input": np.zeros((4, 1, 28, 28), np.float32), "labels": np.zeros(4, np.float32)}, "integer class"),
    ],
)
def test_bad_feeds(sample_model: Path, feeds: dict, message: str) -> None:
    with pytest.raises(CalibrationDataError, match=message):
        list(CalibrationData([feeds], specs(sample_model)))


def test_empty_sources(sample_model: Path, tmp_path: Path) -> None:
    empty_npz = tmp_path / "empty.npz"
    np.savez(empty_npz, input=np.zeros((0, 1, 28, 28), np.float32))
    with pytest.raises(CalibrationDataError, match="is empty"):
        list(CalibrationData(empty_npz, specs(sample_model)))
    with pytest.raises(CalibrationDataError, match="is empty"):
        list(CalibrationData([], specs(sample_model)))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CalibrationDataError, match=r"holds no \.npz or \.npy files"):
        list(CalibrationData(tmp_path / "nothing", specs(sample_model)))
    with pytest.raises(CalibrationDataError, match="no such file"):
        list(CalibrationData(tmp_path / "missing.npz", specs(sample_model)))
    garbage = tmp_path / "garbage.npz"
    garbage.write_text("not numpy")
    with pytest.raises(CalibrationDataError, match="not a readable"):
        list(CalibrationData(garbage, specs(sample_model)))


def test_bad_options(sample_model: Path) -> None:
    with pytest.raises(UsageError, match="batch size 0 must be at least 1"):
        CalibrationData([], specs(sample_model), batch_size=0)
    model = load_model(sample_model)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UsageError, match="offers no CUDAExecutionProvider"):
            create_session(model, device="cuda")
    session = create_session(model, device="auto")
    assert session.provider in ("cpu", "cuda")


def test_analyze_cli(sample_model: Path, sample_calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats.npz"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "splinecompress.cli",
            "analyze",
            str(sample_model),
            "--calib",
            str(sample_calib),
            "-o",
            str(out),
            "--batch-size",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "mean distance" in result.stdout and "provider cpu" in result.stdout
    stats = SplineStats.load(out)
    assert stats.samples == 500 and len(stats.groups) == 6
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "splinecompress.cli",
            "analyze",
            str(sample_model),
            "--calib",
            str(sample_model),
            "-o",
            str(tmp_path / "x.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "not a readable" in bad.stderr
    assert not (tmp_path / "x.npz").exists()


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from splinecompress.calib.calibrate import calibrate
    from splinecompress.graph.groups import analyze_groups
    from splinecompress.model import load_model

    model = load_model(sys.argv[1])
    batches = int(sys.argv[2])

    class Reader:
        def __init__(self):
            self.rng, self.left = np.random.default_rng(0), batches
        def get_next(self):
            if self.left == 0:
                return None
            self.left -= 1
            return {"input": self.rng.standard_normal((32, 1, 28, 28)).astype(np.float32)}

    stats = calibrate(model, analyze_groups(model), Reader(), batch_size=32)
    assert stats.samples == 32 * batches
    # VmHWM: peak RSS of this process image (ru_maxrss would also count the parent that forked us).
    status = open("/proc/self/status").read()
    print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    """
)


def test_memory_stays_flat_when_data_grows_8x(sample_model: Path, tmp_path: Path) -> None:
    script = tmp_path / "measure.py"
    script.write_text(_MEMORY_SCRIPT)

    def peak_kib(batches: int) -> int:
        run = subprocess.run(
            [sys.executable, str(script), str(sample_model), str(batches)], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr
        return int(run.stdout.strip().splitlines()[-1])

    small, large = peak_kib(6), peak_kib(48)
    print(f"peak RSS: {small / 1024:.0f} MiB for 192 samples, {large / 1024:.0f} MiB for 1536 samples")
    # One batch of probe tensors is about 25 MB; keeping even a fraction of 42 extra batches would show.
    assert large - small < 30 * 1024, f"peak RSS grew by {(large - small) / 1024:.0f} MiB with 8x the data"
