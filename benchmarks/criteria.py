"""Does the spline criterion earn its place? Every criterion x scope x ratio x repair on the MNIST sample.

    python benchmarks/criteria.py [--out benchmarks/out] [--seeds 5]

For both exports of the sample (BatchNorm folded: ``mnist_cnn.onnx``; BatchNorm kept: ``mnist_cnn_bn.onnx``, where
``l1`` reads the raw conv weights and ``bn`` is available), ratios 0.2/0.3/0.5/0.7, scopes layer/global, repairs
none/bias/lstsq, no fine-tuning: validation top-1 on the 1,000 held-out digits and the fraction of FLOPs kept.
``random`` is averaged over several seeds (mean, with min..max). Prints one table (markdown) and writes a PNG of
accuracy vs FLOPs kept per criterion (lstsq repair), plus a CSV of every run.

Statistics (codes, sink sums, sink second moments) are computed once per model on the 500 calibration digits;
second moments do not depend on the plan, so least squares re-uses them for every plan.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from splinecompress.report import plot_points  # noqa: E402
from splinecompress.sweep import prepare, sweep  # noqa: E402

RATIOS = (0.2, 0.3, 0.5, 0.7)
SCOPES = ("layer", "global")
REPAIRS = ("none", "bias", "lstsq")


def run_model(label: str, path: Path, criteria: list[str], seeds: int, calib: Path, val: Path) -> list[dict]:
    prepared = prepare(path, calib)
    original = sweep(prepared, val, [0.0], criterion="random", repair="none")[0].accuracy
    print(f"{label}: original val accuracy {original:.4f}", flush=True)
    rows = []
    for criterion in criteria:
        for seed in range(seeds if criterion == "random" else 1):
            for scope in SCOPES:
                for repair in REPAIRS:
                    for point in sweep(
                        prepared, val, RATIOS, criterion=criterion, scope=scope, repair=repair, seed=seed
                    ):
                        rows.append(
                            {
                                "model": label,
                                "criterion": criterion,
                                "seed": seed,
                                "scope": scope,
                                "ratio": point.ratio,
                                "repair": repair,
                                "flops_kept": point.flops_kept,
                                "accuracy": point.accuracy,
                                "original": original,
                            }
                        )
            print(f"  {criterion} seed {seed} done", flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (model, criterion, scope, ratio): accuracy per repair, random as mean (min..max)."""
    keys = sorted(
        {(r["model"], r["criterion"], r["scope"], r["ratio"]) for r in rows}, key=lambda k: (k[0], k[2], k[3], k[1])
    )
    table = []
    for model, criterion, scope, ratio in keys:
        line = {"model": model, "criterion": criterion, "scope": scope, "ratio": ratio}
        for repair in REPAIRS:
            runs = [
                r
                for r in rows
                if (r["model"], r["criterion"], r["scope"], r["ratio"], r["repair"])
                == (model, criterion, scope, ratio, repair)
            ]
            acc = np.array([r["accuracy"] for r in runs])
            line[repair] = (acc.mean(), acc.min(), acc.max(), len(acc))
            line["flops_kept"] = float(np.mean([r["flops_kept"] for r in runs]))
        table.append(line)
    return table


def markdown(table: list[dict]) -> str:
    def cell(stat) -> str:
        mean, low, high, n = stat
        return f"{mean:.1%}" if n == 1 else f"{mean:.1%} ({low:.1%}..{high:.1%})"

    lines = [
        "| model | scope | ratio | criterion | FLOPs kept | none | bias | lstsq |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['model']} | {t['scope']} | {t['ratio']} | {t['criterion']} | {t['flops_kept']:.1%} | "
            f"{cell(t['none'])} | {cell(t['bias'])} | {cell(t['lstsq'])} |"
        )
    return "\n".join(lines)


def plot(table: list[dict], path: Path) -> None:
    """Accuracy (lstsq repair) against FLOPs kept, one line per criterion, one panel per model and scope."""
    series = {}
    for t in table:
        key = (f"{t['model']}, {t['scope']} scope, lstsq repair", t["criterion"])
        mean, low, high, _ = t["lstsq"]
        series.setdefault(key, []).append((t["flops_kept"], mean, low, high))
    if plot_points(series, path):
        print(f"wrote {path}")
    else:
        print("matplotlib is not installed (pip install 'splinecompress[plot]'): no PNG written")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"), help="folder for the PNG and CSV")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the random criterion")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=("folded", "bn-kept"),
        default=["folded", "bn-kept"],
        help="which export of the sample to run (default both)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = REPO / "samples"
    calib = samples / "mnist_calib.npz"
    val = samples / "mnist_val.npz"
    start = time.perf_counter()
    rows = []
    if "folded" in args.models:
        rows += run_model(
            "folded", samples / "mnist_cnn.onnx", ["spline", "l1", "apoz", "random"], args.seeds, calib, val
        )
    if "bn-kept" in args.models:
        rows += run_model("bn-kept", samples / "mnist_cnn_bn.onnx", ["spline", "l1", "bn", "apoz"], 1, calib, val)
    with open(out / "criteria.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = summarise(rows)
    print()
    print(markdown(table))
    plot(table, out / "criteria.png")
    print(f"\n{len(rows)} pruned models evaluated in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
