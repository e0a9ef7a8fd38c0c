"""Calibration and validation data: any source in, checked batches of feed dicts out.

Sources (DESIGN.md, "Calibration input"):
- an onnxruntime ``CalibrationDataReader``: anything with ``get_next() -> dict[input name, ndarray] | None``;
- an iterable of feed dicts (a dict may also carry ``labels``);
- a ``.npz`` file: one array per model input, keyed by input name (a single-input model accepts any one key),
  and optionally ``labels``;
- a folder of ``.npy`` / ``.npz`` files, read in name order (``.npy`` only for single-input models).

Every chunk is checked against the model's inputs (names, rank, dtype, fixed dimensions) before it is handed on,
so nothing runs on data that does not fit. Chunks are re-batched to the requested batch size while streaming:
at most one batch is buffered, whatever the size of the source. A model with a fixed batch dimension gets
batches of exactly that size; the last one is padded by repeating its final sample, and ``Batch.valid`` says how
many rows are real, so no sample is dropped and none is counted twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splinecompress.errors import CalibrationDataError, UsageError
from splinecompress.model import TensorSpec

__all__ = ["Batch", "CalibrationData", "DEFAULT_BATCH_SIZE", "LABELS_KEY", "load_npz"]

log = logging.getLogger(__name__)

LABELS_KEY = "labels"
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class Batch:
    """One batch ready for ``session.run``: ``feeds`` by input name, optional ``labels``, ``valid`` real rows."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    valid: int


@dataclass(frozen=True)
class _Chunk:
    """A piece of a source as it came: arrays sharing their first dimension."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    origin: str

    @property
    def size(self) -> int:
        return len(next(iter(self.arrays.values())))


def load_npz(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Read a .npz data file into (arrays by key, labels or None).

    Raises:
        CalibrationDataError: the file is missing or not a readable .npz/.npy archive.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            return {path.stem: np.load(path, allow_pickle=False)}, None
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as e:
        raise CalibrationDataError(f"{path}: not a readable .npz/.npy file: {e}") from e
    labels = arrays.pop(LABELS_KEY, None)
    return arrays, labels


class CalibrationData:
    """A data source bound to a model's inputs, iterated as checked, re-batched :class:`Batch` objects.

    Args:
        source: a path (.npz file or folder), a CalibrationDataReader, or an iterable of feed dicts.
        inputs: the model's input specs (``splinecompress.model.input_specs``).
        batch_size: rows per batch; ignored (with a log line) when the model's batch dimension is fixed.
        role: word used in messages ("calibration", "validation").

    Iterating more than once works for files and re-iterable sources; a reader is rewound with ``rewind()``
    when it has one. ``num_samples`` is set after the first complete pass.
    """

    def __init__(
        self,
        source: Any,
        inputs: Sequence[TensorSpec],
        *,
        batch_size: int | None = None,
        role: str = "calibration",
    ) -> None:
        self.source = source
        self.inputs = tuple(inputs)
        self.role = role
        self.batch_size = _resolve_batch_size(self.inputs, batch_size)
        self.num_samples: int | None = None
        self._passes = 0

    def __iter__(self) -> Iterator[Batch]:
        count = 0
        for batch in self._rebatch(self._checked_chunks()):
            count += batch.valid
            yield batch
        if count == 0:
            raise CalibrationDataError(f"{self.role} data {self._describe_source()} is empty: it yields no samples")
        self.num_samples = count

    # -- reading ----------------------------------------------------------------------------------------------

    def _describe_source(self) -> str:
        if isinstance(self.source, str | os.PathLike):
            return f"'{self.source}'"
        return f"from {type(self.source).__name__}"

    def _raw_chunks(self) -> Iterator[_Chunk]:
        source = self.source
        if isinstance(source, str | os.PathLike):
            yield from self._path_chunks(Path(source))
            return
        if hasattr(source, "get_next"):
            if self._passes > 0:
                if not hasattr(source, "rewind"):
                    raise CalibrationDataError(
                        f"{self.role} data reader {type(source).__name__} cannot be read twice: give it a rewind() "
                        "method or pass a file"
                    )
                source.rewind()
            self._passes += 1
            index = 0
            while (feeds := source.get_next()) is not None:
                yield self._chunk_from_feeds(feeds, f"{type(source).__name__} item {index}")
                index += 1
            return
        if isinstance(source, Mapping):
            raise CalibrationDataError(
                f"{self.role} data is a single dict: pass a list of feed dicts, a reader or a .npz path"
            )
        if isinstance(source, Iterable):
            if self._passes > 0 and iter(source) is source:
                raise CalibrationDataError(f"{self.role} data iterator was used up: pass a list or a file")
            self._passes += 1
            for index, feeds in enumerate(source):
                if not isinstance(feeds, Mapping):
                    raise CalibrationDataError(
                        f"{self.role} data item {index} is a {type(feeds).__name__}, expected a dict of input name "
                        "-> array"
                    )
                yield self._chunk_from_feeds(feeds, f"item {index}")
            return
        raise CalibrationDataError(
            f"{self.role} data of type {type(source).__name__} is not supported: pass a .npz file, a folder of "
            ".npy/.npz files, a CalibrationDataReader or an iterable of feed dicts"
        )

    def _path_chunks(self, path: Path) -> Iterator[_Chunk]:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
            if not files:
                raise CalibrationDataError(f"{self.role} data folder {path} holds no .npz or .npy files")
            for file in files:
                yield self._chunk_from_file(file)
        elif path.exists():
            yield self._chunk_from_file(path)
        else:
            raise CalibrationDataError(f"{self.role} data {path}: no such file or folder")

    def _chunk_from_file(self, path: Path) -> _Chunk:
        arrays, labels = load_npz(path)
        return self._chunk_from_feeds({**arrays, **({LABELS_KEY: labels} if labels is not None else {})}, str(path))

    def _chunk_from_feeds(self, feeds: Mapping[str, Any], origin: str) -> _Chunk:
        feeds = dict(feeds)
        labels = feeds.pop(LABELS_KEY, None)
        names = [spec.name for spec in self.inputs]
        if len(names) == 1 and len(feeds) == 1 and names[0] not in feeds:
            # A single-input model accepts any one key (e.g. "x" or "images").
            feeds = {names[0]: next(iter(feeds.values()))}
        missing = [n for n in names if n not in feeds]
        if missing:
            raise CalibrationDataError(
                f"{self.role} data {origin}: no array for model input(s) {missing}; it has {sorted(feeds)} "
                f"(the model's inputs are {names})"
            )
        extra = sorted(set(feeds) - set(names))
        if extra:
            raise CalibrationDataError(
                f"{self.role} data {origin}: array(s) {extra} match no model input (inputs: {names}; "
                f"only '{LABELS_KEY}' may be added)"
            )
        arrays = {}
        for spec in self.inputs:
            arrays[spec.name] = _checked_array(feeds[spec.name], spec, f"{self.role} data {origin}")
        sizes = {name: len(a) for name, a in arrays.items()}
        if len(set(sizes.values())) > 1:
            raise CalibrationDataError(f"{self.role} data {origin}: inputs have different sample counts {sizes}")
        size = next(iter(sizes.values()))
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim != 1 or len(labels) != size:
                raise CalibrationDataError(
                    f"{self.role} data {origin}: '{LABELS_KEY}' has shape {labels.shape}, expected ({size},): one "
                    "label per sample"
                )
            if not np.issubdtype(labels.dtype, np.integer):
                raise CalibrationDataError(
                    f"{self.role} data {origin}: '{LABELS_KEY}' must be integer class indices, got {labels.dtype}"
                )
        return _Chunk(arrays, labels, origin)

    def _checked_chunks(self) -> Iterator[_Chunk]:
        with_labels: bool | None = None
        for chunk in self._raw_chunks():
            has = chunk.labels is not None
            if with_labels is not None and has != with_labels:
                raise CalibrationDataError(
                    f"{self.role} data {chunk.origin}: some parts carry '{LABELS_KEY}' and some do not"
                )
            with_labels = has
            if chunk.size:
                yield chunk

    # -- batching ---------------------------------------------------------------------------------------------

    def _rebatch(self, chunks: Iterator[_Chunk]) -> Iterator[Batch]:
        size = self.batch_size
        pending: list[_Chunk] = []
        held = 0
        for chunk in chunks:
            pending.append(chunk)
            held += chunk.size
            while held >= size:
                batch, pending = _take(pending, size)
                held -= size
                yield batch
        if held:
            batch, _ = _take(pending, held)
            yield self._pad(batch) if self._fixed_batch else batch

    @property
    def _fixed_batch(self) -> bool:
        return any(isinstance(spec.shape[0], int) for spec in self.inputs if spec.shape)

    def _pad(self, batch: Batch) -> Batch:
        missing = self.batch_size - batch.valid
        if missing <= 0:
            return batch
        feeds = {k: np.concatenate([v, np.repeat(v[-1:], missing, axis=0)]) for k, v in batch.feeds.items()}
        return Batch(feeds, batch.labels, batch.valid)


def _take(pending: list[_Chunk], size: int) -> tuple[Batch, list[_Chunk]]:
    """Cut the first ``size`` rows off the pending chunks."""
    parts: list[_Chunk] = []
    rest: list[_Chunk] = []
    need = size
    for chunk in pending:
        if need == 0:
            rest.append(chunk)
        elif chunk.size <= need:
            parts.append(chunk)
            need -= chunk.size
        else:
            parts.append(_slice(chunk, 0, need))
            rest.append(_slice(chunk, need, chunk.size))
            need = 0
    names = parts[0].arrays.keys()
    feeds = {n: np.concatenate([p.arrays[n] for p in parts]) if len(parts) > 1 else parts[0].arrays[n] for n in names}
    labels = None
    if parts[0].labels is not None:
        labels = np.concatenate([p.labels for p in parts]) if len(parts) > 1 else parts[0].labels
    return Batch(feeds, labels, size), rest


def _slice(chunk: _Chunk, start: int, stop: int) -> _Chunk:
    labels = None if chunk.labels is None else chunk.labels[start:stop]
    return _Chunk({k: v[start:stop] for k, v in chunk.arrays.items()}, labels, chunk.origin)


def _resolve_batch_size(inputs: Sequence[TensorSpec], batch_size: int | None) -> int:
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be at least 1")
    fixed = {spec.shape[0] for spec in inputs if spec.shape and isinstance(spec.shape[0], int)}
    if len(fixed) > 1:
        raise CalibrationDataError(f"the model's inputs have different fixed batch sizes {sorted(fixed)}")
    if fixed:
        (fixed_size,) = fixed
        if batch_size is not None and batch_size != fixed_size:
            log.info("the model's batch dimension is fixed at %d: batch size %d is ignored", fixed_size, batch_size)
        return fixed_size
    return batch_size or DEFAULT_BATCH_SIZE


def _checked_array(value: Any, spec: TensorSpec, where: str) -> np.ndarray:
    array = np.asarray(value)
    if spec.dtype is not None and array.dtype != spec.dtype:
        raise CalibrationDataError(
            f"{where}: input '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype} "
            f"(convert with .astype(np.{spec.dtype}))"
        )
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise CalibrationDataError(
                f"{where}: input '{spec.name}' has shape {array.shape} (rank {array.ndim}), the model expects "
                f"{spec.shape_text()} (rank {len(spec.shape)}), batch first"
            )
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            # Axis 0 is the batch: re-batching takes care of it.
            if axis > 0 and isinstance(want, int) and got != want:
                raise CalibrationDataError(
                    f"{where}: input '{spec.name}' has shape {array.shape}, the model expects {spec.shape_text()} "
                    f"(dimension {axis} is {got}, must be {want})"
                )
    return array
