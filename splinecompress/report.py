"""Turning results into text: one function builds rows, another renders them; only the CLI prints."""

from __future__ import annotations

from collections.abc import Sequence

from splinecompress.model import ModelInfo

__all__ = ["format_bytes", "format_count", "format_model_info", "model_info_rows", "render_table"]


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


def format_model_info(info: ModelInfo) -> str:
    """The text `splinecompress inspect` prints: a summary, then node counts by op type."""
    summary = render_table(model_info_rows(info), numeric=False)
    ops = render_table([(op, str(n)) for op, n in info.op_counts.items()], header=("op type", "nodes"))
    return f"{summary}\n\n{ops}"
