"""PruningPlan: per group, the channel indices kept; JSON on disk; validated against the model it was made for.

A plan names its model by graph hash, so a plan made for another model (or another export of it) is refused
with a message that says so. Groups a plan does not list keep all their channels. The JSON is meant to be read
and edited by people::

    {"format": "splinecompress.plan", "version": 1, "model_hash": "3f2a...", "criterion": "random",
     "ratio": 0.3, "scope": "layer", "round_to": 1,
     "groups": [{"id": 0, "name": "/conv1/Conv", "channels": 64, "keep": [0, 2, 3, ...]}, ...]}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splinecompress._io import atomic_path
from splinecompress.errors import PlanError, UsageError
from splinecompress.graph.groups import Groups

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "PruningPlan", "random_plan", "round_channels"]

PLAN_FORMAT = "splinecompress.plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class PruningPlan:
    """Kept channel indices per group id, and what produced them.

    Attributes:
        model_hash: graph hash (``splinecompress.model.graph_hash``) of the model the plan was made for.
        keep: group id -> sorted kept channel indices. Groups not listed keep everything.
        criterion: the scoring criterion that chose the channels (``"random"``, ``"spline"``, ...).
        ratio: the fraction of prunable channels the policy aimed to remove, if any.
        scope: ``"layer"`` or ``"global"`` (how the ratio was applied), if any.
        round_to: kept counts were rounded to multiples of this.
        names: group id -> group name, written to JSON for people; not used to validate.
        channels: group id -> group size when the plan was made; checked on validate.
    """

    model_hash: str
    keep: Mapping[int, tuple[int, ...]]
    criterion: str = "manual"
    ratio: float | None = None
    scope: str | None = None
    round_to: int = 1
    names: Mapping[int, str] = field(default_factory=dict)
    channels: Mapping[int, int] = field(default_factory=dict)

    def pruned_groups(self, groups: Groups) -> dict[int, np.ndarray]:
        """Group id -> kept indices for the groups that actually lose channels."""
        return {
            gid: np.asarray(kept, dtype=np.int64)
            for gid, kept in sorted(self.keep.items())
            if gid < len(groups) and len(kept) < groups[gid].channels
        }

    def validate(self, groups: Groups) -> None:
        """Check the plan against the groups of the model it is applied to.

        Raises:
            PlanError: the plan was made for another model, names a group the model lacks, removes channels of a
                group that is not prunable, keeps an index out of range or twice, or empties a group.
        """
        if self.model_hash != groups.model_hash:
            raise PlanError(
                f"plan was made for model with hash {self.model_hash}, this model has {groups.model_hash}: "
                "make a new plan for this model"
            )
        for gid, kept in sorted(self.keep.items()):
            if not 0 <= gid < len(groups):
                raise PlanError(f"plan names group {gid}, but the model has groups 0..{len(groups) - 1}")
            group = groups[gid]
            label = group.label
            if gid in self.channels and self.channels[gid] != group.channels:
                raise PlanError(f"{label}: plan says {self.channels[gid]} channels, the model has {group.channels}")
            if len(kept) == 0:
                raise PlanError(f"{label}: keeps no channels; keep at least one")
            for index in kept:
                if not 0 <= index < group.channels:
                    raise PlanError(f"{label}: index {index} out of range 0..{group.channels - 1}")
            if len(set(kept)) != len(kept):
                raise PlanError(f"{label}: keeps some indices twice")
            if len(kept) < group.channels and not group.prunable:
                raise PlanError(f"{label}: is not prunable ({group.reason}) but the plan removes channels from it")

    # -- JSON
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model_hash": self.model_hash,
            "criterion": self.criterion,
            "ratio": self.ratio,
            "scope": self.scope,
            "round_to": self.round_to,
            "groups": [
                {"id": gid, "name": self.names.get(gid), "channels": self.channels.get(gid), "keep": list(kept)}
                for gid, kept in sorted(self.keep.items())
            ],
        }

    def to_json(self) -> str:
        # one group per line keeps a large plan diffable and editable by hand
        head = {k: v for k, v in self.to_dict().items() if k != "groups"}
        lines = [json.dumps(g) for g in self.to_dict()["groups"]]
        body = ",\n    ".join(lines)
        text = json.dumps(head, indent=2)[:-2] + ',\n  "groups": [\n    ' + body + "\n  ]\n}\n"
        return text if lines else json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: object, *, source: str = "plan") -> PruningPlan:
        """Build a plan from its JSON dict.

        Raises:
            PlanError: the data is not a splinecompress plan or a field has the wrong type.
        """
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source}: not a splinecompress plan (expected \"format\": \"{PLAN_FORMAT}\")")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"{source}: plan version {data.get('version')} is not supported (expected "
                            f"{PLAN_VERSION})")
        if not isinstance(data.get("model_hash"), str):
            raise PlanError(f"{source}: \"model_hash\" must be a string")
        groups = data.get("groups", [])
        if not isinstance(groups, list):
            raise PlanError(f"{source}: \"groups\" must be a list")
        keep, names, channels = {}, {}, {}
        for entry in groups:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
                raise PlanError(f"{source}: each group needs an integer \"id\", got {entry!r:.80}")
            gid = entry["id"]
            kept = entry.get("keep")
            if not isinstance(kept, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
                raise PlanError(f"{source}: group {gid}: \"keep\" must be a list of integers")
            if gid in keep:
                raise PlanError(f"{source}: group {gid} is listed twice")
            keep[gid] = tuple(sorted(kept))
            if entry.get("name") is not None:
                names[gid] = str(entry["name"])
            if isinstance(entry.get("channels"), int):
                channels[gid] = entry["channels"]
        return cls(
            model_hash=data["model_hash"],
            keep=keep,
            criterion=str(data.get("criterion", "manual")),
            ratio=data.get("ratio"),
            scope=data.get("scope"),
            round_to=int(data.get("round_to", 1)),
            names=names,
            channels=channels,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON, atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PruningPlan:
        """Read a plan written by :meth:`save` (or by hand).

        Raises:
            PlanError: the file is missing, is not JSON, or is not a plan.
        """
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"{path}: no such plan file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanError(f"{path}: not a JSON file: {e}") from e
        return cls.from_dict(data, source=str(path))


def round_channels(keep: float, channels: int, round_to: int = 1) -> int:
    """Number of channels to keep, rounded to the nearest multiple of ``round_to``.

    Never 0 and never above ``channels``: a group smaller than ``round_to`` keeps everything, and a group
    whose size is not a multiple of ``round_to`` may keep all its channels.

    Raises:
        UsageError: ``round_to`` < 1.
    """
    if round_to < 1:
        raise UsageError(f"round_to must be >= 1, got {round_to}")
    rounded = math.floor(keep / round_to + 0.5) * round_to
    return int(min(channels, max(rounded, round_to, 1)))


def random_plan(groups: Groups, ratio: float, *, seed: int = 0, round_to: int = 1,
                group_ids: Sequence[int] | None = None) -> PruningPlan:
    """A plan removing about ``ratio`` of every prunable group's channels, chosen at random (tests, benchmarks).

    Args:
        groups: the model's groups.
        ratio: fraction of channels to remove per group, in [0, 1).
        seed: seed of the random choice.
        round_to: keep a multiple of this many channels.
        group_ids: restrict to these groups (default: every prunable group).

    Raises:
        UsageError: ratio out of range.
    """
    if not 0 <= ratio < 1:
        raise UsageError(f"ratio must be in [0, 1), got {ratio}")
    rng = np.random.default_rng(seed)
    chosen = set(group_ids) if group_ids is not None else None
    keep = {}
    for g in groups.prunable():
        if chosen is not None and g.id not in chosen:
            continue
        n = round_channels(g.channels * (1 - ratio), g.channels, round_to)
        keep[g.id] = tuple(int(i) for i in np.sort(rng.choice(g.channels, size=n, replace=False)))
    return PruningPlan(
        model_hash=groups.model_hash,
        keep=keep,
        criterion="random",
        ratio=ratio,
        scope="layer",
        round_to=round_to,
        names={gid: groups[gid].name for gid in keep},
        channels={gid: groups[gid].channels for gid in keep},
    )
