"""SplineStats: streamed, mergeable statistics of the spline codes of every prunable group.

For each group, over all calibration positions (sample x spatial position x probe tensor), the code bit of
channel k is ``probe[k] > 0`` (PAPER.md). Each batch is reduced on the spot to:

- ``positions`` M: how many code vectors were seen;
- ``on_counts[k]``: how many of them have channel k on;
- ``coactive[k, k']`` = G = B^T B: how many have both k and k' on (exact integers), so that the normalised
  Hamming distance between two channels' codes is (on_k + on_k' - 2 G_kk') / M;
- ``active_sums[k]``: sum of max(probe, 0), the post-activation mass (the tie-break of the spline criterion);
- ``sink_sums``: per tensor a sink reads, the sum of that tensor per channel (and per position block when a
  Flatten gives each channel several features), with its row count: the means bias compensation folds in.

Nothing here grows with the number of samples, and statistics add: ``merge`` of shards equals one pass
exactly (without ``max_positions`` subsampling, which draws positions at random).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splinecompress._io import atomic_path
from splinecompress.errors import CalibrationDataError
from splinecompress.graph.groups import Group, Groups, Member

__all__ = ["GroupStats", "SplineStats", "SinkSums", "StatsAccumulator", "group_code_summary"]

# Products of 0/1 values summed in float32 stay exact below 2**24; larger batches are cut into row blocks.
_EXACT_ROWS = 1 << 24


@dataclass
class SinkSums:
    """Sum of one sink-input tensor per group channel (``sums[c, j]``: feature j of channel c's block)."""

    tensor: str
    rows: int
    sums: np.ndarray  # float64 [C, stride]


@dataclass
class GroupStats:
    """Code statistics of one group (see the module docstring)."""

    group_id: int
    channels: int
    positions: int
    on_counts: np.ndarray  # int64 [C]
    coactive: np.ndarray  # int64 [C, C]
    active_sums: np.ndarray  # float64 [C]
    sink_sums: dict[str, SinkSums] = field(default_factory=dict)

    @classmethod
    def empty(cls, group: Group) -> GroupStats:
        c = group.channels
        return cls(group.id, c, 0, np.zeros(c, np.int64), np.zeros((c, c), np.int64), np.zeros(c, np.float64))

    def hamming(self) -> np.ndarray:
        """Normalised Hamming distance between every pair of channels' codes, D[k, k'] in [0, 1]."""
        if self.positions == 0:
            raise CalibrationDataError(f"group {self.group_id}: no calibration positions were seen")
        on = self.on_counts.astype(np.float64)
        return (on[:, None] + on[None, :] - 2.0 * self.coactive) / float(self.positions)

    def on_fraction(self) -> np.ndarray:
        return self.on_counts / max(self.positions, 1)

    def dead(self) -> np.ndarray:
        """Channels never on over the calibration data."""
        return self.on_counts == 0

    def always_on(self) -> np.ndarray:
        return self.on_counts == self.positions

    def mean_activation(self) -> np.ndarray:
        return self.active_sums / max(self.positions, 1)


@dataclass
class SplineStats:
    """Statistics of every calibrated group of one model (keyed by group id), and how they were made."""

    model_hash: str
    groups: dict[int, GroupStats]
    samples: int = 0
    provider: str = "cpu"
    max_positions: int | None = None

    def __getitem__(self, group_id: int) -> GroupStats:
        return self.groups[group_id]

    def merge(self, other: SplineStats) -> SplineStats:
        """The statistics of both shards together (exactly one pass over their union).

        Raises:
            CalibrationDataError: the shards belong to different models or groups.
        """
        if other.model_hash != self.model_hash:
            raise CalibrationDataError(
                f"cannot merge statistics of model {other.model_hash} into those of model {self.model_hash}"
            )
        if set(other.groups) != set(self.groups):
            raise CalibrationDataError("cannot merge statistics computed over different groups")
        merged = {}
        for gid, a in self.groups.items():
            b = other.groups[gid]
            if a.channels != b.channels or set(a.sink_sums) != set(b.sink_sums):
                raise CalibrationDataError(f"group {gid}: statistics have different shapes and cannot be merged")
            sinks = {
                t: SinkSums(t, s.rows + b.sink_sums[t].rows, s.sums + b.sink_sums[t].sums)
                for t, s in a.sink_sums.items()
            }
            merged[gid] = GroupStats(
                gid,
                a.channels,
                a.positions + b.positions,
                a.on_counts + b.on_counts,
                a.coactive + b.coactive,
                a.active_sums + b.active_sums,
                sinks,
            )
        providers = self.provider if self.provider == other.provider else f"{self.provider}+{other.provider}"
        return SplineStats(self.model_hash, merged, self.samples + other.samples, providers, self.max_positions)

    # -- persistence ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``.npz`` atomically (temp file + rename)."""
        path = Path(path)
        meta = {
            "format": "splinecompress.stats/1",
            "model_hash": self.model_hash,
            "samples": self.samples,
            "provider": self.provider,
            "max_positions": self.max_positions,
            "groups": {
                str(gid): {"channels": g.channels, "positions": g.positions, "sinks": sorted(g.sink_sums)}
                for gid, g in self.groups.items()
            },
        }
        arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
        for gid, g in self.groups.items():
            arrays[f"g{gid}.on_counts"] = g.on_counts
            arrays[f"g{gid}.coactive"] = g.coactive
            arrays[f"g{gid}.active_sums"] = g.active_sums
            for k, (tensor, s) in enumerate(sorted(g.sink_sums.items())):
                arrays[f"g{gid}.sink{k}.sums"] = s.sums
                arrays[f"g{gid}.sink{k}.rows"] = np.array(s.rows, np.int64)
                arrays[f"g{gid}.sink{k}.tensor"] = np.array(tensor)
        with atomic_path(path, suffix=".npz") as tmp:  # numpy appends .npz to names without it
            np.savez_compressed(tmp, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SplineStats:
        """Read statistics written by :meth:`save`.

        Raises:
            CalibrationDataError: the file is missing or not a splinecompress statistics file.
        """
        path = Path(path)
        if not path.is_file():
            raise CalibrationDataError(f"{path}: no such statistics file")
        try:
            with np.load(path, allow_pickle=False) as archive:
                data = {k: archive[k] for k in archive.files}
            meta = json.loads(str(data["meta"]))
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise CalibrationDataError(f"{path}: not a splinecompress statistics file ({e})") from e
        if meta.get("format") != "splinecompress.stats/1":
            raise CalibrationDataError(f"{path}: not a splinecompress statistics file (format {meta.get('format')})")
        groups = {}
        for key, info in meta["groups"].items():
            gid = int(key)
            sinks = {}
            for k in range(len(info["sinks"])):
                tensor = str(data[f"g{gid}.sink{k}.tensor"])
                sinks[tensor] = SinkSums(tensor, int(data[f"g{gid}.sink{k}.rows"]), data[f"g{gid}.sink{k}.sums"])
            groups[gid] = GroupStats(
                gid,
                int(info["channels"]),
                int(info["positions"]),
                data[f"g{gid}.on_counts"],
                data[f"g{gid}.coactive"],
                data[f"g{gid}.active_sums"],
                sinks,
            )
        return cls(meta["model_hash"], groups, int(meta["samples"]), meta["provider"], meta["max_positions"])


class StatsAccumulator:
    """Reduces batches of probe and sink-input tensors to :class:`SplineStats`, one batch at a time.

    Args:
        groups: the analysed groups; only prunable groups with probes are accumulated unless ``group_ids`` says.
        max_positions: at most this many code vectors per probe tensor per batch, drawn at random (seeded).
        seed: seed of that draw.
    """

    def __init__(
        self,
        groups: Groups,
        *,
        group_ids: list[int] | None = None,
        max_positions: int | None = None,
        seed: int = 0,
    ) -> None:
        if max_positions is not None and max_positions < 1:
            raise CalibrationDataError(f"max_positions {max_positions} must be at least 1")
        self.model_hash = groups.model_hash
        ids = group_ids if group_ids is not None else [g.id for g in groups.prunable() if g.probe_slices]
        self.groups = [groups[i] for i in ids]
        self.max_positions = max_positions
        self.rng = np.random.default_rng(seed)
        self.stats = {g.id: GroupStats.empty(g) for g in self.groups}
        self.samples = 0

    def tensors(self) -> list[str]:
        """Every tensor the accumulator needs from each batch."""
        names = [m.tensor for g in self.groups for m in (*g.probe_slices, *g.sink_inputs)]
        return list(dict.fromkeys(names))

    def update(self, values: dict[str, np.ndarray], samples: int) -> None:
        """Fold one batch in. ``values`` maps tensor names to the batch's arrays (batch first)."""
        self.samples += samples
        for group in self.groups:
            stats = self.stats[group.id]
            for member in _unique_tensors(group.probe_slices):
                codes_input = _channel_matrix(values[member.tensor], member, group.channels)
                if self.max_positions is not None and len(codes_input) > self.max_positions:
                    rows = self.rng.choice(len(codes_input), self.max_positions, replace=False)
                    codes_input = codes_input[np.sort(rows)]
                _add_codes(stats, codes_input)
            for member in _unique_tensors(group.sink_inputs):
                _add_sink_sums(stats, values[member.tensor], member, group.channels)

    def finalize(self, provider: str = "cpu") -> SplineStats:
        return SplineStats(self.model_hash, dict(self.stats), self.samples, provider, self.max_positions)


def _unique_tensors(members: tuple[Member, ...]) -> list[Member]:
    """One member per tensor: two consumers of one tensor must not count its positions twice."""
    return list({m.tensor: m for m in members}.values())


def _channel_matrix(value: np.ndarray, member: Member, channels: int) -> np.ndarray:
    """[positions, C] view of a probe tensor: one row per (sample, spatial position, block feature)."""
    moved = np.moveaxis(value, member.axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    picked = flat[:, member.indices(np.arange(channels))]  # [rows, C * stride], channel-major
    if member.stride == 1:
        return picked
    # Each feature of a channel's block is one more position of that channel's code.
    return picked.reshape(len(flat), channels, member.stride).transpose(0, 2, 1).reshape(-1, channels)


def _add_codes(stats: GroupStats, values: np.ndarray) -> None:
    bits = values > 0
    stats.positions += len(bits)
    stats.on_counts += bits.sum(axis=0, dtype=np.int64)
    stats.active_sums += np.maximum(values, 0).sum(axis=0, dtype=np.float64)
    for start in range(0, len(bits), _EXACT_ROWS):
        block = bits[start : start + _EXACT_ROWS].astype(np.float32)
        stats.coactive += np.rint(block.T @ block).astype(np.int64)


def _add_sink_sums(stats: GroupStats, value: np.ndarray, member: Member, channels: int) -> None:
    moved = np.moveaxis(value, member.axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    sums = flat[:, member.indices(np.arange(channels))].sum(axis=0, dtype=np.float64).reshape(channels, member.stride)
    entry = stats.sink_sums.get(member.tensor)
    if entry is None:
        stats.sink_sums[member.tensor] = SinkSums(member.tensor, len(flat), sums)
    else:
        entry.rows += len(flat)
        entry.sums += sums


def group_code_summary(stats: GroupStats) -> dict[str, float | int]:
    """Channels, dead, always-on and the mean pairwise code distance of one group."""
    c = stats.channels
    distance = stats.hamming()
    mean_pairwise = float(distance[np.triu_indices(c, 1)].mean()) if c > 1 else 0.0
    return {
        "group": stats.group_id,
        "channels": c,
        "positions": stats.positions,
        "dead": int(stats.dead().sum()),
        "always_on": int(stats.always_on().sum()),
        "mean_distance": mean_pairwise,
    }
