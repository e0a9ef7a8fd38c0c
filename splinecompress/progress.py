"""A minimal progress line on stderr for long steps (no dependency; silent when stderr is not a terminal)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def progress(
    items: Iterable[T],
    label: str,
    *,
    total: int | None = None,
    stream: TextIO | None = None,
    enabled: bool | None = None,
) -> Iterator[T]:
    """Yield ``items`` unchanged, redrawing ``label: done/total`` on one stderr line at most 10 times a second.

    ``enabled`` defaults to whether the stream is a terminal, so logs and CI output stay clean.
    """
    stream = stream or sys.stderr
    if enabled is None:
        enabled = stream.isatty()
    if not enabled:
        yield from items
        return
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= 0.1:
            last = now
            of = f"/{total}" if total else ""
            stream.write(f"\r{label}: {done}{of} batches ({now - start:.1f} s)")
            stream.flush()
    stream.write(f"\r{label}: {done} batches in {time.perf_counter() - start:.1f} s\n")
    stream.flush()
