"""Early-Bird ticket detection for PyTorch training loops: draw the ticket when the network has stopped changing.

Two rules share one machinery (a record per epoch, the full epoch-by-epoch distance matrix, a heat map):

- :class:`SplineEarlyBird`, the paper's spline rule: after each epoch the spline codes (the sign of the input of
  every piecewise-linear activation) of a fixed probe batch are recorded; the distance between two epochs is the
  normalised Hamming distance of the codes per layer, averaged over layers without weights. The ticket is drawn
  at the first epoch whose largest distance to each of the previous ``lookback`` (3) epochs is below
  ``threshold`` (0.16).
- :class:`MaskEarlyBird`, the original EB-tickets rule (You et al. 2020): channel masks keep the top ``1 - ratio``
  channels by |BatchNorm gamma|; the distance is the fraction of mask bits that differ; the ticket is drawn when
  the current mask is within ``threshold`` (0.1) of each of the previous 4 (the last 5 masks).

Usage, in any training loop::

    detector = SplineEarlyBird(model, probe_batch)
    for epoch in range(epochs):
        train_one_epoch(model)
        step = detector.update()
        if step.ticket:
            break  # prune now, train only the pruned network
    detector.save_heatmap("eb.png")

Codes are stored bit-packed (``np.packbits``: one bit per unit and position) and distances are computed on the
packed bits, so a record costs an eighth of the boolean codes. torch is imported lazily: ``import
splinecompress.earlybird`` works without it.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splinecompress._optional import require_torch
from splinecompress.errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_ACTIVATIONS",
    "EarlyBirdStep",
    "MaskEarlyBird",
    "PackedBits",
    "SplineEarlyBird",
    "colormap",
    "gamma_masks",
    "hamming_packed",
    "heatmap_image",
    "write_png",
]

logger = logging.getLogger(__name__)

# Module class names whose input sign is a spline code (DESIGN.md "probes"), looked up in torch.nn lazily.
DEFAULT_ACTIVATIONS: tuple[str, ...] = ("ReLU", "ReLU6", "LeakyReLU", "PReLU", "Hardswish", "GELU", "SiLU")
_MASK_SCOPES = ("global", "layer")
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Packed bits


@dataclass(frozen=True)
class PackedBits:
    """A boolean array stored as ``np.packbits`` of its flattened values, with the shape to restore it."""

    data: np.ndarray  # uint8, ceil(size / 8)
    shape: tuple[int, ...]

    @classmethod
    def pack(cls, bits: np.ndarray) -> PackedBits:
        bits = np.asarray(bits, dtype=bool)
        return cls(np.packbits(bits.reshape(-1)), tuple(bits.shape))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def unpack(self) -> np.ndarray:
        """The boolean array, in its original shape."""
        return np.unpackbits(self.data, count=self.size).astype(bool).reshape(self.shape)


def _popcount(data: np.ndarray) -> int:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: a vectorised popcount
        return int(np.bitwise_count(data).sum(dtype=np.int64))
    return int(_POPCOUNT[data].sum(dtype=np.int64))


def _differing_bits(a: PackedBits, b: PackedBits, what: str) -> int:
    if a.shape != b.shape:
        raise UsageError(f"{what}: cannot compare codes of shape {a.shape} with codes of shape {b.shape}")
    # Padding bits of the last byte are zero in both, so they never count.
    return _popcount(np.bitwise_xor(a.data, b.data))


def hamming_packed(a: PackedBits, b: PackedBits) -> float:
    """Normalised Hamming distance mean(|q - q'|) of two packed boolean arrays of the same shape.

    Raises:
        UsageError: the shapes differ.
    """
    if a.size == 0:
        return 0.0
    return _differing_bits(a, b, "hamming_packed") / a.size


# ---------------------------------------------------------------------------------------------------------------
# The shared record of epochs


@dataclass(frozen=True)
class EarlyBirdStep:
    """What one ``update()`` found.

    Attributes:
        epoch: the label of this record (by default 1 for the first update, then counting up).
        compared: the earlier epochs it was compared with (at most ``lookback``), most recent first.
        distances: the distance to each of them, in the same order.
        max_distance: the largest of ``distances`` (nan when there is nothing to compare with yet).
        ticket: the rule holds at this epoch: ``lookback`` earlier epochs exist and all are within ``threshold``.
        ticket_epoch: the first epoch at which the rule held, if any (it stays fixed once drawn).
        layer_distances: per layer (or BatchNorm module), the distance to the previous epoch.
    """

    epoch: int
    compared: tuple[int, ...]
    distances: tuple[float, ...]
    max_distance: float
    ticket: bool
    ticket_epoch: int | None
    layer_distances: dict[str, float]


class _EarlyBirdRule:
    """Records one signature per epoch (per-layer packed bits) and applies the lookback/threshold rule."""

    def __init__(self, lookback: int, threshold: float) -> None:
        if isinstance(lookback, bool) or not isinstance(lookback, int) or lookback < 1:
            raise UsageError(f"lookback {lookback!r} must be an integer of at least 1 (epochs compared with)")
        if not 0.0 < float(threshold) < 1.0:
            raise UsageError(f"threshold {threshold!r} must lie in (0, 1): it bounds a normalised Hamming distance")
        self.lookback = lookback
        self.threshold = float(threshold)
        self.ticket_epoch: int | None = None
        self._epochs: list[int] = []
        self._records: list[dict[str, PackedBits]] = []
        self._rows: list[list[float]] = []  # row i: distances of record i to records 0..i-1

    @property
    def epochs(self) -> tuple[int, ...]:
        """Labels of the recorded epochs, in recording order (rows of :meth:`distance_matrix`)."""
        return tuple(self._epochs)

    def _distance(self, a: dict[str, PackedBits], b: dict[str, PackedBits]) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define how two records are compared")

    def _record(self, signature: dict[str, PackedBits], epoch: int | None) -> EarlyBirdStep:
        if epoch is None:
            epoch = self._epochs[-1] + 1 if self._epochs else 1
        row = [self._distance(signature, previous) for previous in self._records]
        self._epochs.append(int(epoch))
        self._records.append(signature)
        self._rows.append(row)
        recent = list(range(len(row) - 1, max(len(row) - self.lookback, 0) - 1, -1))
        distances = tuple(row[i] for i in recent)
        max_distance = max(distances) if distances else math.nan
        ticket = len(distances) == self.lookback and max_distance < self.threshold
        if ticket and self.ticket_epoch is None:
            self.ticket_epoch = int(epoch)
            logger.info("early-bird ticket drawn at epoch %d (max distance %.4f)", epoch, max_distance)
        layers: dict[str, float] = {}
        if len(self._records) > 1:
            previous = self._records[-2]
            layers = {name: hamming_packed(bits, previous[name]) for name, bits in signature.items()}
        return EarlyBirdStep(
            int(epoch),
            tuple(self._epochs[i] for i in recent),
            distances,
            max_distance,
            ticket,
            self.ticket_epoch,
            layers,
        )

    def distance_matrix(self) -> np.ndarray:
        """Symmetric [E, E] matrix of the distances between every two recorded epochs (zero diagonal)."""
        n = len(self._rows)
        matrix = np.zeros((n, n), dtype=np.float64)
        for i, row in enumerate(self._rows):
            matrix[i, : len(row)] = row
        return matrix + matrix.T

    def save_heatmap(self, path: str | os.PathLike[str], *, cell: int = 24) -> Path:
        """Write the distance matrix as a PNG heat map (dark = close, bright = far; the ticket epoch framed in red).

        Rows and columns are the recorded epochs in order; a colour bar on the right runs from 0 (bottom) to the
        largest distance (top).

        Raises:
            UsageError: nothing has been recorded yet.
        """
        if not self._rows:
            raise UsageError("no epoch recorded yet: call update() after each epoch before save_heatmap()")
        mark = self._epochs.index(self.ticket_epoch) if self.ticket_epoch is not None else None
        return write_png(path, heatmap_image(self.distance_matrix(), cell=cell, mark=mark))


def _epoch_label(step_epoch: int | None) -> int | None:
    if step_epoch is not None and (isinstance(step_epoch, bool) or not isinstance(step_epoch, int)):
        raise UsageError(f"epoch {step_epoch!r} must be an integer or None")
    return step_epoch


# ---------------------------------------------------------------------------------------------------------------
# The spline rule


class SplineEarlyBird(_EarlyBirdRule):
    """The spline Early-Bird rule: stop when the spline codes of a fixed probe batch stop changing.

    Args:
        model: the torch network being trained.
        probe_inputs: a fixed batch: a tensor (or array), a tuple/list of them (positional inputs) or a dict
            (keyword inputs). It is moved to the model's device on each update.
        lookback: number of previous epochs each epoch is compared with.
        threshold: the ticket is drawn when the largest of those distances is below this.
        layers: names (as in ``model.named_modules()``) of the modules whose input sign is read; by default
            every ReLU, ReLU6, LeakyReLU, PReLU, Hardswish, GELU and SiLU module.

    Raises:
        UsageError: lookback < 1, threshold outside (0, 1), no activation module found, or an unknown layer name.

    Codes are read with forward pre-hooks (a ReLU may work in place and overwrite its input) that exist only
    during :meth:`update`. A module called several times in one forward pass (a shared ``self.relu``) gives one
    layer per call: ``name``, ``name#1``, ... Activations applied as functions (``F.relu``) are not seen: use
    modules, or name other modules in ``layers``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        probe_inputs: Any,
        lookback: int = 3,
        threshold: float = 0.16,
        layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(lookback, threshold)
        self.model = model
        self.probe_inputs = probe_inputs
        self.layers = _find_layers(model, layers)

    def update(self, epoch: int | None = None) -> EarlyBirdStep:
        """Record the codes of the probe batch now and apply the rule (call once per epoch).

        The model runs in eval mode under ``torch.no_grad``; each module's train/eval mode is restored after.

        Args:
            epoch: label of this record; by default one more than the previous label (1 for the first).

        Raises:
            UsageError: the model cannot run on the probe batch (e.g. a batch of the wrong shape), or no
                activation layer was called during the forward pass.
        """
        return self._record(self.capture(), _epoch_label(epoch))

    def capture(self) -> dict[str, PackedBits]:
        """The packed codes of the probe batch for the model as it is now, without recording them.

        Raises:
            UsageError: as :meth:`update`.
        """
        torch = require_torch("early-bird detection")
        captured: dict[str, PackedBits] = {}
        calls: dict[str, int] = {}

        def hook_for(name: str):
            def hook(module, inputs) -> None:
                if not inputs or not torch.is_tensor(inputs[0]):
                    return
                count = calls.get(name, 0)
                calls[name] = count + 1
                key = name if count == 0 else f"{name}#{count}"
                captured[key] = PackedBits.pack((inputs[0].detach() > 0).cpu().numpy())

            return hook

        modules = dict(self.model.named_modules())
        handles = [modules[name].register_forward_pre_hook(hook_for(name)) for name in self.layers]
        modes = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()
            with torch.no_grad():
                _run_model(self.model, self.probe_inputs)
        finally:
            for handle in handles:
                handle.remove()
            for module, training in modes.items():
                module.training = training
        if not captured:
            raise UsageError(
                f"none of the {len(self.layers)} activation layers ({', '.join(self.layers[:5])}"
                f"{', ...' if len(self.layers) > 5 else ''}) ran on the probe batch: name layers the forward pass calls"
            )
        if self._records and set(captured) != set(self._records[0]):
            raise UsageError(
                f"the layers that ran changed between epochs: {sorted(self._records[0])} then {sorted(captured)}"
            )
        return captured

    def _distance(self, a: dict[str, PackedBits], b: dict[str, PackedBits]) -> float:
        # Unweighted mean over layers, as in the official Spline-EB code: a small layer counts as much as a big one.
        return float(np.mean([hamming_packed(a[name], b[name]) for name in a]))

    def codes(self, index: int = -1) -> dict[str, np.ndarray]:
        """The boolean codes of one record (by position in :attr:`epochs`; -1 is the latest), per layer.

        Each array has the shape of the activation's input (batch first, channels on axis 1).
        """
        return {name: bits.unpack() for name, bits in self._records[index].items()}

    def on_counts(self, index: int = -1) -> dict[str, np.ndarray]:
        """Per layer, how often each channel (axis 1) was on over the probe batch and all positions."""
        counts = {}
        for name, bits in self.codes(index).items():
            axes = tuple(i for i in range(bits.ndim) if i != 1)
            counts[name] = bits.sum(axis=axes, dtype=np.int64) if bits.ndim > 1 else bits.astype(np.int64)
        return counts



def _find_layers(model: torch.nn.Module, layers: Sequence[str] | None) -> list[str]:
    torch = require_torch("early-bird detection")
    modules = dict(model.named_modules())
    if layers is not None:
        if isinstance(layers, str):
            layers = [layers]
        unknown = [name for name in layers if name not in modules]
        if unknown:
            available = ", ".join(n for n in modules if n) or "none"
            raise UsageError(f"layers {unknown} are not modules of the model; its modules are: {available}")
        if not layers:
            raise UsageError("layers is empty: name at least one module, or pass None for every activation")
        return list(dict.fromkeys(layers))
    kinds = tuple(getattr(torch.nn, name) for name in DEFAULT_ACTIVATIONS if hasattr(torch.nn, name))
    found = [name for name, module in modules.items() if isinstance(module, kinds)]
    if not found:
        raise UsageError(
            f"no activation layers found in {type(model).__name__}: it has no {', '.join(DEFAULT_ACTIVATIONS)} "
            "module (functional activations such as F.relu are invisible to hooks); pass layers=[module names]"
        )
    return found


def _shape_of(inputs: Any) -> str:
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k}: {_shape_of(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(_shape_of(v) for v in inputs) + ")"
    shape = getattr(inputs, "shape", None)
    return str(tuple(shape)) if shape is not None else type(inputs).__name__


def _run_model(model: torch.nn.Module, inputs: Any) -> Any:
    torch = require_torch("early-bird detection")
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else None

    def to_tensor(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        return value.to(device) if device is not None and torch.is_tensor(value) else value

    try:
        if isinstance(inputs, dict):
            return model(**{k: to_tensor(v) for k, v in inputs.items()})
        if isinstance(inputs, (tuple, list)):
            return model(*(to_tensor(v) for v in inputs))
        return model(to_tensor(inputs))
    except Exception as e:  # torch raises RuntimeError, ValueError, TypeError... for a batch that does not fit
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"the model cannot run on the probe batch of shape {_shape_of(inputs)}: {first_line}") from e


# ---------------------------------------------------------------------------------------------------------------
# The EB-tickets baseline rule


class MaskEarlyBird(_EarlyBirdRule):
    """The EB-tickets rule (You et al. 2020): stop when the |BN gamma| channel masks stop changing.

    Args:
        model: the torch network being trained; its ``BatchNorm2d`` modules give the masks.
        ratio: fraction of channels pruned by the mask (the top ``1 - ratio`` |gamma| are kept).
        lookback: number of previous masks compared with (4: the last 5 masks, as in the EB-tickets code).
        threshold: the ticket is drawn when all those distances are below this (0.1 in EB tickets).
        scope: "global" (one |gamma| threshold over all BN modules, as in EB tickets) or "layer" (the same
            fraction in each BN module).

    Raises:
        UsageError: lookback, threshold, ratio or scope out of range, or no BatchNorm2d module in the model.

    The distance of two masks is the fraction of channels (over all BN modules together) whose bit differs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        ratio: float = 0.5,
        lookback: int = 4,
        threshold: float = 0.1,
        scope: str = "global",
    ) -> None:
        super().__init__(lookback, threshold)
        if not 0.0 <= float(ratio) < 1.0:
            raise UsageError(f"ratio {ratio!r} must lie in [0, 1): it is the fraction of channels pruned")
        if scope not in _MASK_SCOPES:
            raise UsageError(f"scope {scope!r} is not one of {', '.join(_MASK_SCOPES)}")
        torch = require_torch("early-bird detection")
        self.model = model
        self.ratio = float(ratio)
        self.scope = scope
        self.layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and m.affine]
        if not self.layers:
            raise UsageError(f"no BatchNorm2d module with a learnable scale in {type(model).__name__}: no mask to take")

    def update(self, epoch: int | None = None) -> EarlyBirdStep:
        """Take the masks now and apply the rule (call once per epoch).

        Args:
            epoch: label of this record; by default one more than the previous label (1 for the first).
        """
        masks = gamma_masks(self.model, self.ratio, scope=self.scope, layers=self.layers)
        return self._record({name: PackedBits.pack(mask) for name, mask in masks.items()}, _epoch_label(epoch))

    def _distance(self, a: dict[str, PackedBits], b: dict[str, PackedBits]) -> float:
        differing = sum(_differing_bits(a[name], b[name], name) for name in a)
        return differing / sum(bits.size for bits in a.values())

    def masks(self, index: int = -1) -> dict[str, np.ndarray]:
        """The boolean keep-masks of one record (by position in :attr:`epochs`), per BatchNorm module."""
        return {name: bits.unpack() for name, bits in self._records[index].items()}


def gamma_masks(
    model: torch.nn.Module, ratio: float, *, scope: str = "global", layers: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Keep-masks of the top ``1 - ratio`` channels by |BatchNorm gamma|, per BatchNorm2d module.

    Ties at the threshold are broken by channel order so exactly the requested count is kept.
    """
    torch = require_torch("early-bird detection")
    modules = dict(model.named_modules())
    names = (
        list(layers) if layers is not None else [n for n, m in modules.items() if isinstance(m, torch.nn.BatchNorm2d)]
    )
    gammas = {name: modules[name].weight.detach().abs().cpu().numpy().astype(np.float64) for name in names}
    if scope == "layer":
        return {name: _top_mask(g, len(g) - round(ratio * len(g))) for name, g in gammas.items()}
    flat = np.concatenate(list(gammas.values()))
    mask = _top_mask(flat, len(flat) - round(ratio * len(flat)))
    out, start = {}, 0
    for name, g in gammas.items():
        out[name] = mask[start : start + len(g)]
        start += len(g)
    return out


def _top_mask(values: np.ndarray, keep: int) -> np.ndarray:
    mask = np.zeros(len(values), dtype=bool)
    mask[np.argsort(-values, kind="stable")[: max(keep, 0)]] = True
    return mask


# ---------------------------------------------------------------------------------------------------------------
# PNG output without matplotlib

# A few stops of the viridis colour map, interpolated linearly.
_VIRIDIS = np.array(
    [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
     [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]],
    dtype=np.float64,
)  # fmt: skip


def colormap(values: np.ndarray) -> np.ndarray:
    """Viridis-like RGB (uint8, shape + (3,)) of values in [0, 1] (clipped; nan is grey)."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    low = np.floor(v).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (v - low)[..., None]
    rgb = _VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac
    rgb[np.isnan(values)] = 128
    return rgb.round().astype(np.uint8)


def heatmap_image(matrix: np.ndarray, *, cell: int = 24, mark: int | None = None) -> np.ndarray:
    """RGB image of a square matrix, ``cell`` pixels per entry, with a colour bar; ``mark`` frames a diagonal cell."""
    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[0]
    top = float(np.nanmax(matrix)) if matrix.size and np.nanmax(matrix) > 0 else 1.0
    cells = colormap(matrix / top)
    image = np.full((n * cell, n * cell + 3 * cell, 3), 255, dtype=np.uint8)
    image[:, : n * cell] = np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)
    if mark is not None and 0 <= mark < n:
        y0, y1 = mark * cell, (mark + 1) * cell - 1
        for y in (y0, y0 + 1, y1 - 1, y1):
            image[y, y0 : y1 + 1] = (255, 0, 0)
            image[y0 : y1 + 1, y] = (255, 0, 0)
    bar = colormap(np.linspace(1.0, 0.0, n * cell))[:, None, :]
    image[:, n * cell + cell : n * cell + 2 * cell] = bar
    return image


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> Path:
    """Write an RGB (uint8 [H, W, 3]) or grey (uint8 [H, W]) image as a PNG file, with zlib and nothing else."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise UsageError(f"write_png needs a uint8 [H, W, 3] image, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    # Each scanline starts with filter type 0 (none).
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rgb.reshape(height, -1)], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path
