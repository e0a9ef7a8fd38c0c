"""The main job, measured: repair matters, and a 50%-FLOPs resnet50 really runs faster.

    python benchmarks/compress.py [--skip-resnet50]

1. MNIST sample (real digits), ratios 0.3/0.5/0.7, layer scope, channels rounded to 8 (compress's defaults):
   val top-1 for repair none/bias/lstsq with the spline criterion and the baselines l1 and random (mean of 3 seeds).
2. torchvision resnet50 with random weights at 224x224 (no pretrained weights exist offline; structure and speed
   are what is measured): ``compress`` at a 50% FLOPs target with lstsq repair on 16 random calibration images,
   onnxruntime CPU latency ratio original/slim (batch 1, 1 thread, interleaved runs) next to the FLOPs ratio,
   and the total time compress took.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from splinecompress.compress import compress  # noqa: E402
from splinecompress.sweep import prepare, sweep  # noqa: E402

RATIOS = (0.3, 0.5, 0.7)
REPAIRS = ("none", "bias", "lstsq")


def sample_table() -> None:
    samples = REPO / "samples"
    prepared = prepare(samples / "mnist_cnn.onnx", samples / "mnist_calib.npz")
    val = samples / "mnist_val.npz"
    original = sweep(prepared, val, [0.0], criterion="random", repair="none")[0].accuracy
    print(f"MNIST sample: original val top-1 {original:.1%}\n")
    print("| criterion | ratio | FLOPs kept | none | bias | lstsq |")
    print("|---|---|---|---|---|---|")
    for criterion, seeds in (("spline", 1), ("l1", 1), ("random", 3)):
        results = {}
        for repair in REPAIRS:
            runs = [
                sweep(prepared, val, RATIOS, criterion=criterion, repair=repair, round_to=8, seed=s)
                for s in range(seeds)
            ]
            results[repair] = [
                (np.mean([r[i].accuracy for r in runs]), runs[0][i].flops_kept) for i in range(len(RATIOS))
            ]
        name = criterion if seeds == 1 else f"{criterion} (mean of {seeds})"
        for i, ratio in enumerate(RATIOS):
            cells = " | ".join(f"{results[r][i][0]:.1%}" for r in REPAIRS)
            print(f"| {name} | {ratio} | {results['none'][i][1]:.1%} | {cells} |", flush=True)


def resnet50_row() -> None:
    from tests.zoo import export_zoo_model

    with tempfile.TemporaryDirectory() as tmp:
        model = export_zoo_model("resnet50", tmp, input_shape=(1, 3, 224, 224))
        rng = np.random.default_rng(0)
        calib = {"input": rng.standard_normal((16, 3, 224, 224)).astype(np.float32)}
        start = time.perf_counter()
        result = compress(
            model, [calib], Path(tmp) / "slim.onnx", flops_target=0.5, repair="lstsq", measure_latency=True
        )
        seconds = time.perf_counter() - start
    v = result.validation
    flops_ratio = v.reference.flops / v.model.flops
    latency_ratio = v.reference.latency_ms_median / v.model.latency_ms_median
    print("\nresnet50 (random weights, 224x224), compress --flops-target 0.5 --repair lstsq, 16 calibration images")
    print(
        "| params | FLOPs ratio | latency orig (ms) | latency slim (ms) | latency ratio | latency/FLOPs | compress s |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {v.reference.params / 1e6:.1f}M -> {v.model.params / 1e6:.1f}M | {flops_ratio:.2f} | "
        f"{v.reference.latency_ms_median:.1f} | {v.model.latency_ms_median:.1f} | {latency_ratio:.2f} | "
        f"{latency_ratio / flops_ratio:.2f} | {seconds:.0f} |"
    )
    print(
        f"(provider {v.provider}, {v.threads} thread(s), batch {v.latency_batch}, median of {v.repeats} runs; "
        f"agreement with the original on the calibration images {v.agreement:.1%}; peak RSS of the process "
        f"{peak_rss_mib():.0f} MiB)"
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-resnet50", action="store_true")
    parser.add_argument("--skip-sample", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_sample:
        sample_table()
    if not args.skip_resnet50:
        resnet50_row()


if __name__ == "__main__":
    main()
