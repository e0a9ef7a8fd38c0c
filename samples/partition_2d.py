"""The paper's toy: a 2 -> 20 -> 2 ReLU network on "X" data, pruned by splinecompress, drawn as its spline partition.

Each hidden unit k cuts the plane along its line {h_k = 0}; pruning a unit deletes its line. The picture shows,
for the trained network and after removing 20/40/60/80% of the hidden units with the spline criterion
(analyze_groups -> calibrate -> score("spline") -> make_plan -> repair (lstsq by default, ``--repair none`` for
plain removal) -> apply_plan; no fine-tuning):
the lines read from the first Gemm of each ONNX model, the decision regions computed by onnxruntime on a grid,
and the data::

    python samples/partition_2d.py --out-dir samples/out

Writes ``partition_2d.png`` (one panel per model, left to right: dense, then each ratio; the caption under a
panel is "removed% accuracy%") and the ONNX models to the output folder, and prints each model's accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SAMPLES_DIR = Path(__file__).resolve().parent
# Make ``splinecompress`` importable when run as a script from anywhere.
sys.path.insert(0, str(SAMPLES_DIR.parent))

from splinecompress.calib.runner import create_session  # noqa: E402
from splinecompress.criteria import CriterionInput, score  # noqa: E402
from splinecompress.earlybird import write_png  # noqa: E402
from splinecompress.graph.surgery import apply_plan  # noqa: E402
from splinecompress.model import save_model  # noqa: E402

DEFAULT_RATIOS = (0.2, 0.4, 0.6, 0.8)
HIDDEN = 20
EXTENT = 1.25  # the panels show [-EXTENT, EXTENT]^2; the data fill [-1, 1]^2
PANEL = 260  # pixels per panel side

# Colours (RGB): light class regions, darker points, grey lines, black decision boundary.
REGION = np.array([[198, 219, 239], [253, 208, 162]], dtype=np.uint8)
POINT = np.array([[33, 113, 181], [217, 72, 1]], dtype=np.uint8)
LINE = np.array([90, 90, 90], dtype=np.uint8)
BOUNDARY = np.array([0, 0, 0], dtype=np.uint8)


def make_x_data(points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform points in [-1, 1]^2, labelled by the "X" of the lines y = x and y = -x.

    The two lines cut the square into four wedges; class 1 is the left and right wedges (|y| < |x|), class 0
    the top and bottom ones (|y| > |x|): the 45-degree rotation of class = [x * y > 0].
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(points, 2)).astype(np.float32)
    labels = (np.abs(x[:, 1]) < np.abs(x[:, 0])).astype(np.int64)
    return x, labels


def train_mlp(x: np.ndarray, labels: np.ndarray, *, epochs: int, seed: int):
    """Full-batch Adam on a 2 -> HIDDEN -> 2 ReLU MLP; returns the trained torch module (eval mode)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(xt), yt)
        loss.backward()
        opt.step()
    return net.eval()


def first_gemm_lines(model) -> tuple[np.ndarray, np.ndarray]:
    """(W [K, 2], b [K]) of the first Gemm: hidden unit k's line is W[k] . p + b[k] = 0."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "Gemm")
    weight = inits[node.input[1]]
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    weight = weight if trans_b else weight.T
    bias = inits[node.input[2]] if len(node.input) > 2 else np.zeros(len(weight), dtype=weight.dtype)
    return weight.astype(np.float64), bias.astype(np.float64)


def predict(model, x: np.ndarray) -> np.ndarray:
    """Class predictions of an ONNX model with onnxruntime."""
    session = create_session(model, device="cpu")
    return session.run({"input": np.ascontiguousarray(x, dtype=np.float32)}, ["logits"])[0].argmax(axis=1)


def draw_panel(model, x: np.ndarray, labels: np.ndarray, caption: str) -> np.ndarray:
    """One RGB panel: decision regions and boundary, the hidden units' lines, the data, and a caption."""
    size = PANEL
    coords = np.linspace(-EXTENT, EXTENT, size)
    gx, gy = np.meshgrid(coords, coords[::-1])  # row 0 is the top of the picture
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    classes = predict(model, grid).reshape(size, size)
    image = REGION[classes].copy()
    # Hidden units' lines: pixels within about one pixel of {W[k] . p + b[k] = 0}.
    weight, bias = first_gemm_lines(model)
    pixel = 2 * EXTENT / (size - 1)
    for w, b in zip(weight, bias, strict=True):
        norm = np.hypot(*w)
        if norm > 0:
            image[np.abs(gx * w[0] + gy * w[1] + b) / norm < 0.6 * pixel] = LINE
    # Decision boundary: a class change to the right or below.
    edge = np.zeros_like(classes, dtype=bool)
    edge[:, :-1] |= classes[:, 1:] != classes[:, :-1]
    edge[:-1, :] |= classes[1:, :] != classes[:-1, :]
    image[edge] = BOUNDARY
    # Data: a subsample of points as 2x2 dots.
    step = max(1, len(x) // 600)
    cols = np.clip(np.round((x[::step, 0] + EXTENT) / pixel).astype(int), 0, size - 2)
    rows = np.clip(np.round((EXTENT - x[::step, 1]) / pixel).astype(int), 0, size - 2)
    for dy in (0, 1):
        for dx in (0, 1):
            image[rows + dy, cols + dx] = POINT[labels[::step]]
    return _with_caption(image, caption)


# A 3x5 bitmap font for captions: digits, '%', '.', '/', and space.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", "%": "101001010100101", ".": "000000000000010",
    "/": "001001010100100", " ": "000000000000000",
}  # fmt: skip


def _with_caption(panel: np.ndarray, text: str, scale: int = 3) -> np.ndarray:
    band = np.full((7 * scale, panel.shape[1], 3), 255, dtype=np.uint8)
    x0 = scale
    for char in text:
        glyph = np.array([int(c) for c in _GLYPHS.get(char, _GLYPHS[" "])], dtype=bool).reshape(5, 3)
        big = np.kron(glyph, np.ones((scale, scale), dtype=bool))
        if x0 + big.shape[1] > band.shape[1]:
            break
        band[scale : scale + big.shape[0], x0 : x0 + big.shape[1]][big] = 0
        x0 += 4 * scale
    return np.concatenate([panel, band], axis=0)


def run(
    out_dir: str | Path,
    *,
    points: int = 3000,
    epochs: int = 600,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    repair: str = "lstsq",
) -> dict[str, object]:
    """Train, export, prune at each ratio, draw; return {"accuracy": {ratio: acc}, "kept": {...}, "png": path}."""
    from splinecompress.export import export_model
    from splinecompress.policy import make_plan
    from splinecompress.repair import repair_model
    from splinecompress.sweep import prepare

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x, labels = make_x_data(points, seed)
    net = train_mlp(x, labels, epochs=epochs, seed=seed)
    dense_path = out_dir / "partition_2d.onnx"
    export_model(net, dense_path, (1, 2))
    prepared = prepare(dense_path, [{"input": x}], device="cpu")
    model, groups, stats = prepared.model, prepared.groups, prepared.stats
    scores = score("spline", CriterionInput(model, groups, stats))

    models = {0.0: model}
    kept: dict[float, int] = {0.0: HIDDEN}
    for ratio in ratios:
        outcome = make_plan(model, groups, scores, ratio=ratio, scope="layer")
        # Repair refits the output layer on the kept units; the kept units' lines themselves do not move.
        repaired = repair_model(model, groups, outcome.plan, method=repair, stats=stats, moments=prepared.moments)
        slim = apply_plan(repaired.model, repaired.plan).model
        save_model(slim, out_dir / f"partition_2d_r{round(ratio * 100):02d}.onnx")
        models[ratio] = slim
        kept[ratio] = len(first_gemm_lines(slim)[1])

    accuracy = {ratio: float((predict(m, x) == labels).mean()) for ratio, m in models.items()}
    panels = [draw_panel(m, x, labels, f"{round(r * 100)}% {100 * accuracy[r]:.1f}%") for r, m in models.items()]
    gap = np.full((panels[0].shape[0], 8, 3), 255, dtype=np.uint8)
    row = [p for panel in panels for p in (panel, gap)][:-1]
    png = write_png(out_dir / "partition_2d.png", np.concatenate(row, axis=1))
    return {"accuracy": accuracy, "kept": kept, "png": png}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=SAMPLES_DIR / "out")
    p.add_argument("--points", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=600, help="full-batch Adam steps")
    p.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repair", choices=("none", "bias", "lstsq"), default="lstsq",
                   help="training-free repair of the output layer (default lstsq, as compress)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    start = time.perf_counter()
    result = run(args.out_dir, points=args.points, epochs=args.epochs, ratios=args.ratios, seed=args.seed,
                 repair=args.repair)
    print(f"{'removed':>8} {'hidden units':>13} {'accuracy':>9}")
    for ratio, acc in result["accuracy"].items():
        print(f"{ratio:>8.0%} {result['kept'][ratio]:>13d} {acc:>9.4f}")
    print(f"picture: {result['png']}  ({time.perf_counter() - start:.1f}s)")
    return result


if __name__ == "__main__":
    main()
