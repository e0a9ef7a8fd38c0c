"""Turning results into text: one function builds rows, another renders them; only the CLI prints."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from splinecompress._io import atomic_path
from splinecompress.model import ModelInfo

if TYPE_CHECKING:
    from splinecompress.calib.stats import SplineStats
    from splinecompress.compress import CompressResult
    from splinecompress.graph.groups import GroupReport, Groups
    from splinecompress.sweep import SweepPoint
    from splinecompress.validate import ValidationReport

__all__ = [
    "format_stats_summary",
    "stats_summary_rows",
    "format_bytes",
    "format_count",
    "format_model_info",
    "model_info_rows",
    "render_table",
    "comparison_rows",
    "format_comparison",
    "write_report_json",
    "compress_summary_rows",
    "format_compress",
    "format_sweep",
    "group_rows",
    "plot_points",
    "sweep_rows",
]


class _HasDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def format_count(n: float) -> str:
    """1234567 -> '1.23M': counts of parameters and FLOPs at a glance."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def format_bytes(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def render_table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None, *, numeric: bool = True) -> str:
    """Plain aligned columns: the first left-aligned, the rest right-aligned if ``numeric`` else left-aligned."""
    table = [list(header)] if header else []
    table += [list(r) for r in rows]
    if not table:
        return ""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for k, row in enumerate(table):
        rest = [c.rjust(w) if numeric else c.ljust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        cells = [row[0].ljust(widths[0]), *rest]
        lines.append("  ".join(cells).rstrip())
        if header and k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def model_info_rows(info: ModelInfo) -> list[tuple[str, str]]:
    """(label, value) rows describing a model; the graph analysis adds FLOPs and channel groups after these."""
    rows = [("file", info.path or "-")]
    if info.file_bytes is not None:
        rows.append(("file size", format_bytes(info.file_bytes)))
    rows.append(("producer", info.producer or "-"))
    rows.append(("IR version", str(info.ir_version)))
    rows.append(("opsets", ", ".join(f"{d} {v}" for d, v in info.opsets.items())))
    for spec in info.inputs:
        rows.append(("input", f"{spec.name}  {spec.dtype}  {spec.shape_text()}"))
    for spec in info.outputs:
        rows.append(("output", f"{spec.name}  {spec.dtype}  {spec.shape_text()}"))
    rows.append(
        (
            "parameters",
            f"{format_count(info.num_parameters)} ({info.num_parameters:,} in {info.num_initializers} initializers)",
        )
    )
    rows.append(("nodes", f"{sum(info.op_counts.values())}"))
    return rows


def group_rows(report: GroupReport) -> list[tuple[str, ...]]:
    """One row per channel group: id, first source, channels, prunable or why not, share of MACs touched."""
    return [
        (str(r.id), r.name, str(r.channels), "yes" if r.prunable else f"no: {r.reason}", f"{r.flops_share:.1%}")
        for r in report.rows
    ]


def format_model_info(info: ModelInfo, groups: GroupReport | None = None) -> str:
    """The text `splinecompress inspect` prints: a summary, node counts by op type, then the channel groups."""
    rows = model_info_rows(info)
    if groups is not None:
        rows += [
            ("FLOPs (MACs)", f"{format_count(groups.total_macs)} per sample"),
            ("prunable FLOPs", f"{groups.prunable_flops_fraction:.1%} of MACs are in nodes a prunable group touches"),
            ("prunable channels", f"{groups.prunable_channels_fraction:.1%} of channels are in prunable groups"),
        ]
    parts = [render_table(rows, numeric=False)]
    parts.append(render_table([(op, str(n)) for op, n in info.op_counts.items()], header=("op type", "nodes")))
    if groups is not None:
        header = ("group", "first source", "channels", "prunable", "FLOPs share")
        parts.append(render_table(group_rows(groups), header=header, numeric=False))
    return "\n\n".join(parts)


def stats_summary_rows(stats: SplineStats, groups: Groups) -> list[tuple[str, ...]]:
    """One row per calibrated group: channels, positions, dead, always on, mean pairwise code distance."""
    from splinecompress.calib.stats import group_code_summary

    rows = []
    for gid in sorted(stats.groups):
        summary = group_code_summary(stats.groups[gid])
        rows.append(
            (
                str(gid),
                groups[gid].name,
                str(summary["channels"]),
                format_count(summary["positions"]),
                str(summary["dead"]),
                str(summary["always_on"]),
                f"{summary['mean_distance']:.3f}",
            )
        )
    return rows


def format_stats_summary(stats: SplineStats, groups: Groups) -> str:
    header = ("group", "first source", "channels", "positions", "dead", "always on", "mean distance")
    return render_table(stats_summary_rows(stats, groups), header=header)


# -- validation: the before/after table ----------------------------------------------------------------------


def comparison_rows(report: ValidationReport) -> list[tuple[str, ...]]:
    """Rows of the before/after table: (metric, original, slim, change), or (metric, value) without a reference.

    ``change`` is relative for sizes ("-48.2%"), a speed-up factor for latencies ("x1.93": original time over
    slim time, above 1 is faster) and percentage points for accuracy ("-0.3 pt"). Missing values show as "-".

    Example (with a reference)::

        ("parameters", "307k", "159k", "-48.2%")
        ("latency median", "0.467 ms", "0.245 ms", "x1.91")
        ("accuracy", "98.90%", "98.60%", "-0.3 pt")
        ("top-1 agreement", "", "99.10%", "")
    """
    ref = report.reference
    metrics: list[tuple[str, str, Callable[[float], str], Callable[[float | None, float | None], str]]] = [
        ("parameters", "params", format_count, _relative_change),
        ("FLOPs (MACs)", "flops", format_count, _relative_change),
        ("file size", "file_bytes", format_bytes, _relative_change),
        ("latency median", "latency_ms_median", _format_ms, _speedup),
        ("latency p90", "latency_ms_p90", _format_ms, _speedup),
        ("accuracy", "accuracy", _format_fraction, _point_change),
    ]
    if ref is None:
        return [(name, _or_dash(fmt, getattr(report.model, field))) for name, field, fmt, _ in metrics]
    rows: list[tuple[str, ...]] = []
    for name, field, fmt, change in metrics:
        before, after = getattr(ref, field), getattr(report.model, field)
        rows.append((name, _or_dash(fmt, before), _or_dash(fmt, after), change(before, after)))
    rows.append(("top-1 agreement", "", _or_dash(_format_fraction, report.agreement), ""))
    rows.append(("max |diff|", "", _or_dash(_format_diff, report.max_abs_diff), ""))
    rows.append(("mean |diff|", "", _or_dash(_format_diff, report.mean_abs_diff), ""))
    return rows


def format_comparison(report: ValidationReport) -> str:
    """The table `splinecompress validate` prints, then one line saying how it was measured."""
    header = ("metric", "original", "slim", "change") if report.reference is not None else ("metric", "model")
    table = render_table(comparison_rows(report), header=header)
    return f"{table}\n\n{_measurement_note(report)}"


def write_report_json(report: _HasDict, path: str | os.PathLike[str]) -> Path:
    """Write ``report.to_dict()`` as JSON atomically (temporary file in the same folder, then rename).

    Returns:
        The path written.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def _measurement_note(report: ValidationReport) -> str:
    parts = [f"{report.samples} samples (batch {report.batch_size})"]
    if report.repeats:
        threads = "onnxruntime default threads" if report.threads is None else f"{report.threads} thread(s)"
        parts.append(
            f"latency: batch {report.latency_batch}, {threads}, provider {report.provider}, graph optimizations on, "
            f"median/p90 of {report.repeats} runs after {report.warmup} warm-up runs"
        )
    else:
        parts.append(f"latency not measured; provider {report.provider}")
    if report.model.flops is None or (report.reference is not None and report.reference.flops is None):
        parts.append("FLOPs '-': some node shapes are unknown")
    return "\n".join(parts)


def _or_dash(fmt: Callable[[float], str], value: float | None) -> str:
    return "-" if value is None else fmt(value)


def _format_ms(ms: float) -> str:
    return f"{ms:.3f} ms" if ms < 1 else f"{ms:.2f} ms"


def _format_fraction(x: float) -> str:
    return f"{100 * x:.2f}%"


def _format_diff(x: float) -> str:
    return f"{x:.3g}"


def _relative_change(before: float | None, after: float | None) -> str:
    if before is None or after is None or before == 0:
        return "-"
    pct = 100 * (after - before) / before
    return "0.0%" if round(pct, 1) == 0 else f"{pct:+.1f}%"


def _speedup(before: float | None, after: float | None) -> str:
    if before is None or after is None or after <= 0:
        return "-"
    return f"x{before / after:.2f}"


def _point_change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "-"
    points = 100 * (after - before)
    return "0.0 pt" if round(points, 1) == 0 else f"{points:+.1f} pt"


def compress_summary_rows(result: CompressResult) -> list[tuple[str, str]]:
    """(label, value) rows saying what compress did, before the before/after table."""
    plan = result.plan
    budget = f"ratio {plan.ratio}" if plan.ratio is not None else "FLOPs target"
    rows = [
        ("plan", f"criterion {plan.criterion}, scope {plan.scope}, {budget}, round to {plan.round_to}"),
        ("channels removed", f"{result.removed_fraction:.1%} of the prunable channels"),
        ("repair", f"{result.repair} ({result.repaired_sinks} sinks repaired)"),
        ("calibration", f"provider {result.provider}"),
    ]
    if result.equivalence is not None:
        rows.append(("verified", result.equivalence.describe()))
    if result.finetune is not None:
        rows.append(
            (
                "fine-tuned",
                f"{len(result.finetune.history)} epochs of distillation from the original "
                "(the slim column is the fine-tuned model)",
            )
        )
    rows.append(("written", result.output))
    return rows


def format_compress(result: CompressResult, *, verbose: bool = False) -> str:
    """What `splinecompress compress` prints: the summary, the before/after table, the gate verdict."""
    parts = [render_table(compress_summary_rows(result), numeric=False)]
    if verbose:
        rows = [
            (str(g), plan_name, str(k), str(t), f"{1 - k / t:.0%}")
            for g, (k, t) in sorted(result.group_channels.items())
            for plan_name in [result.plan.names.get(g, "")]
        ]
        parts.append(render_table(rows, header=("group", "first source", "kept", "channels", "removed")))
    if result.validation is not None:
        parts.append(format_comparison(result.validation))
    if result.gate_failures:
        parts.append("\n".join(f"GATE FAILED: {reason}" for reason in result.gate_failures))
    return "\n\n".join(parts)


def sweep_rows(points: Sequence[SweepPoint]) -> list[tuple[str, ...]]:
    return [
        (
            f"{p.ratio:.2f}",
            f"{p.flops_kept:.1%}",
            f"{p.params_kept:.1%}",
            "-" if p.accuracy is None else f"{p.accuracy:.2%}",
            f"{p.agreement:.2%}",
        )
        for p in points
    ]


def format_sweep(points: Sequence[SweepPoint]) -> str:
    header = ("ratio", "FLOPs kept", "params kept", "accuracy", "agreement")
    return render_table(sweep_rows(points), header=header)


def plot_points(series: dict[tuple[str, str], list[tuple[float, ...]]], path: str | os.PathLike[str]) -> bool:
    """Draw accuracy against FLOPs kept: one panel per first key, one line per second key.

    Each point is (flops_kept, accuracy) or (flops_kept, accuracy, low, high), the last two drawn as a band.
    Returns False (and draws nothing) when matplotlib is not installed (``pip install 'splinecompress[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = list(dict.fromkeys(panel for panel, _ in series))
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for (owner, label), points in series.items():
            if owner != panel:
                continue
            points = sorted(points)
            flops = [p[0] for p in points]
            ax.plot(flops, [p[1] for p in points], marker="o", label=label)
            if len(points[0]) == 4 and any(p[2] != p[3] for p in points):
                ax.fill_between(flops, [p[2] for p in points], [p[3] for p in points], alpha=0.2)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("FLOPs kept")
        ax.set_ylabel("top-1 accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return True
