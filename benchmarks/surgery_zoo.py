"""Analysis and surgery speed, and whether removed FLOPs turn into real onnxruntime CPU speed, over the zoo.

For each zoo model (random weights, exported at --size): seconds to analyse the groups, seconds of surgery for a
random plan removing --ratio of every prunable group (kept counts rounded to --round-to), the prunable FLOPs
share, and the latency ratio original/slim next to the FLOPs (MACs) ratio original/slim. Latency: onnxruntime
CPUExecutionProvider, all graph optimizations on, --threads intra-op threads, batch 1, warm-up, then the two
models timed in alternation (so drift in machine load hits both alike) and the median of --repeats kept.

    python benchmarks/surgery_zoo.py                       # the whole zoo at 224x224
    python benchmarks/surgery_zoo.py --models resnet50 vgg11_bn --repeats 30

Not a test: it prints measured numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from splinecompress.graph.groups import analyze_groups, group_summary  # noqa: E402
from splinecompress.graph.plan import random_plan  # noqa: E402
from splinecompress.graph.surgery import apply_plan  # noqa: E402
from splinecompress.model import load_model  # noqa: E402
from tests.zoo import ZOO, export_zoo_model  # noqa: E402


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def latencies(sessions: list[ort.InferenceSession], feeds: dict, warmup: int, repeats: int) -> list[float]:
    """Median seconds per run of each session, timed in alternation."""
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for s, t in zip(sessions, times, strict=True):
            start = time.perf_counter()
            s.run(None, feeds)
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(ZOO), help="zoo names (default: all)")
    parser.add_argument("--size", type=int, default=224, help="input height/width for image models (default 224)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction removed per prunable group")
    parser.add_argument("--round-to", type=int, default=8, help="kept channel counts are multiples of this")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "splinecompress_zoo"),
                        help="folder for exported models (reused between runs)")
    args = parser.parse_args()

    print(f"onnxruntime {ort.__version__} CPUExecutionProvider, {args.threads} intra-op thread(s), batch 1, "
          f"ORT_ENABLE_ALL, median of {args.repeats} alternated runs after {args.warmup} warm-up runs; "
          f"plan: random, {args.ratio:.0%} of every prunable group, round_to={args.round_to}")
    header = (f"{'model':<20}{'input':>10}{'analysis s':>11}{'surgery s':>10}{'prunable':>9}{'MACs G':>8}"
              f"{'orig ms':>9}{'slim ms':>9}{'lat ratio':>10}{'FLOPs ratio':>12}{'lat/FLOPs':>10}")
    print(header)
    print("-" * len(header))
    for name in args.models:
        entry = ZOO[name]
        shape = entry.input_shape
        if entry.resizable:
            shape = (1, 3, args.size, args.size)
        path = export_zoo_model(name, args.cache, input_shape=shape)
        model = load_model(path)
        start = time.perf_counter()
        groups = analyze_groups(model)
        analysis_s = time.perf_counter() - start
        plan = random_plan(groups, args.ratio, seed=0, round_to=args.round_to)
        start = time.perf_counter()
        result = apply_plan(model, plan, groups)
        surgery_s = time.perf_counter() - start
        share = group_summary(model, groups).prunable_flops_fraction
        feeds = {model.graph.input[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        t_orig, t_slim = latencies([session(model, args.threads), session(result.model, args.threads)], feeds,
                                   args.warmup, args.repeats)
        lat_ratio = t_orig / t_slim
        flops_ratio = result.macs_before / max(result.macs_after, 1)
        print(f"{name:<20}{'x'.join(map(str, shape[1:])):>10}{analysis_s:>11.2f}{surgery_s:>10.2f}{share:>9.1%}"
              f"{result.macs_before / 1e9:>8.2f}{t_orig * 1e3:>9.1f}{t_slim * 1e3:>9.1f}{lat_ratio:>10.2f}"
              f"{flops_ratio:>12.2f}{lat_ratio / flops_ratio:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
