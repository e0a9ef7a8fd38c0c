"""The main job as one function: analyze -> plan -> repair -> prune -> verify -> save -> validate -> gates.

Defaults are what the MNIST benchmark measured best (README, "Results"): the spline criterion, layerwise, 30% of
the prunable channels, least-squares repair. A failed gate still writes the slim model; the result says why it
failed so that the CLI can exit 1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splinecompress.calib.calibrate import calibrate
from splinecompress.calib.moments import collect_moments
from splinecompress.criteria import DATA_CRITERIA, CriterionInput, score
from splinecompress.errors import UsageError, VerificationError
from splinecompress.graph.equivalence import EquivalenceResult, check_equivalence
from splinecompress.graph.groups import analyze_groups
from splinecompress.graph.plan import PruningPlan
from splinecompress.graph.surgery import apply_plan
from splinecompress.model import load_model, save_model
from splinecompress.policy import DEFAULT_MIN_KEEP, make_plan
from splinecompress.repair import REPAIRS, lstsq_sinks, repair_model
from splinecompress.validate import ValidationReport, validate

__all__ = ["DEFAULT_RATIO", "DEFAULT_ROUND_TO", "CompressResult", "compress"]

log = logging.getLogger(__name__)

DEFAULT_RATIO = 0.3
# Channel counts in multiples of 8: onnxruntime's CPU kernels run a 45-channel conv slower than a 64-channel one
# (README, "Results": the sample at ratio 0.3 ran 0.8x the original's speed unrounded, 1.2x rounded to 8).
DEFAULT_ROUND_TO = 8


@dataclass(frozen=True)
class CompressResult:
    """What ``compress`` did and measured. ``gate_failures`` is empty when every gate passed."""

    output: str
    plan: PruningPlan
    removed_fraction: float
    repair: str
    repaired_sinks: int
    provider: str
    equivalence: EquivalenceResult | None
    validation: ValidationReport | None
    gate_failures: tuple[str, ...] = ()
    group_channels: dict[int, tuple[int, int]] = field(default_factory=dict)  # group id -> (kept, total)
    finetune: Any = None  # a finetune.FinetuneResult when fine-tuning ran (finetune_epochs > 0)

    @property
    def passed(self) -> bool:
        return not self.gate_failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "criterion": self.plan.criterion,
            "scope": self.plan.scope,
            "ratio": self.plan.ratio,
            "removed_fraction": self.removed_fraction,
            "repair": self.repair,
            "repaired_sinks": self.repaired_sinks,
            "provider": self.provider,
            "equivalence": None
            if self.equivalence is None
            else {
                "max_abs": self.equivalence.max_abs,
                "max_rel": self.equivalence.max_rel,
                "passed": self.equivalence.passed,
            },
            "validation": None if self.validation is None else self.validation.to_dict(),
            "gates_passed": self.passed,
            "gate_failures": list(self.gate_failures),
            "groups": {str(g): {"kept": k, "total": t} for g, (k, t) in sorted(self.group_channels.items())},
            "finetune": None if self.finetune is None else self.finetune.to_dict(),
        }


def compress(
    model_path: str | os.PathLike[str],
    calib: Any,
    output: str | os.PathLike[str],
    *,
    ratio: float | None = None,
    flops_target: float | None = None,
    criterion: str = "spline",
    scope: str = "layer",
    repair: str = "lstsq",
    round_to: int = DEFAULT_ROUND_TO,
    min_keep: float = DEFAULT_MIN_KEEP,
    exclude: tuple[int | str, ...] = (),
    val: Any = None,
    min_agreement: float | None = None,
    max_accuracy_drop: float | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    verify: bool = True,
    measure_latency: bool = True,
    seed: int = 0,
    show_progress: bool | None = None,
    finetune_epochs: int = 0,
    train: Any = None,
) -> CompressResult:
    """Prune ``model_path`` with calibration data ``calib`` and write the slim model to ``output``.

    Args:
        model_path: the ONNX model.
        calib: calibration data (``.npz``, folder, reader or feed dicts), no labels needed.
        output: where the slim model goes (written atomically, also when a gate fails).
        ratio / flops_target: the budget (default: ratio 0.3).
        criterion, scope, round_to, min_keep, exclude: see ``policy.make_plan``.
        repair: "none", "bias" or "lstsq".
        val: validation data (labels optional); without it, the calibration data is used for agreement.
        min_agreement: gate: top-1 agreement with the original at least this (0..1).
        max_accuracy_drop: gate: accuracy at most this much below the original's (0..1; needs labels).
        device: "auto", "cpu" or "cuda" for calibration and validation.
        verify: check the slim model against the masked (repaired) original; a failure raises.
        measure_latency: time both models side by side.
        finetune_epochs: when > 0, fine-tune the slim model by distillation from the original for this many
            epochs on ``train`` (``finetune.finetune`` with its defaults) before validation; the fine-tuned model
            replaces the slim one at ``output``.
        train: training data for fine-tuning (labels optional); required when ``finetune_epochs`` > 0.

    Raises:
        UsageError: bad options.
        VerificationError: the slim model differs from the masked original (a bug; nothing is written).
    """
    if ratio is None and flops_target is None:
        ratio = DEFAULT_RATIO
    if repair not in REPAIRS:
        raise UsageError(f"repair '{repair}' is not one of {', '.join(REPAIRS)}")
    for name, value in (("min_agreement", min_agreement), ("max_accuracy_drop", max_accuracy_drop)):
        if value is not None and not 0 <= value <= 1:
            raise UsageError(f"{name} {value} is out of range [0, 1]")
    if finetune_epochs < 0:
        raise UsageError(f"finetune epochs {finetune_epochs} must be 0 or more")
    if finetune_epochs > 0 and train is None:
        raise UsageError("fine-tuning (finetune_epochs > 0) needs training data: pass train (--train)")
    output = Path(output)
    model = load_model(model_path)
    groups = analyze_groups(model)
    log.info("analyze: %d groups, %d prunable", len(groups), len(groups.prunable()))
    stats = calibrate(model, groups, calib, batch_size=batch_size, device=device, show_progress=show_progress)
    scores = score(criterion, CriterionInput(model, groups, stats, seed=seed))
    outcome = make_plan(
        model,
        groups,
        scores,
        ratio=ratio,
        flops_target=flops_target,
        scope=scope,
        min_keep=min_keep,
        round_to=round_to,
        exclude=exclude,
        drop_dead=criterion in DATA_CRITERIA,
        stats=stats,
    )
    plan = outcome.plan
    moments = None
    if repair == "lstsq":
        sinks, unsupported = lstsq_sinks(model, groups, plan)
        for node, why in unsupported.items():
            log.info("lstsq: %s falls back to bias repair: %s", node, why)
        moments = collect_moments(
            model, sinks, calib, batch_size=batch_size, device=device, show_progress=show_progress
        )
    repaired = repair_model(model, groups, plan, method=repair, stats=stats, moments=moments)
    surgery = apply_plan(repaired.model, repaired.plan)
    equivalence = None
    if verify:
        equivalence = check_equivalence(repaired.model, surgery.model, repaired.plan)
        if not equivalence.passed:
            raise VerificationError(
                f"the slim model is not equivalent to the masked original ({equivalence.describe()}); "
                "nothing was written: please report this model"
            )
    save_model(surgery.model, output)

    # -- optional fine-tuning (issue 7): distil the original into the slim model, written over it atomically.
    finetuned = None
    if finetune_epochs > 0:
        from splinecompress.finetune import finetune

        finetuned = finetune(output, model_path, train, output, epochs=finetune_epochs, seed=seed, device=device,
                             show_progress=show_progress)  # fmt: skip

    validation = validate(
        output, val if val is not None else calib, reference=model_path, device=device, measure_latency=measure_latency
    )
    failures = []
    if min_agreement is not None and (validation.agreement or 0.0) < min_agreement:
        failures.append(f"top-1 agreement {validation.agreement:.2%} is below --min-agreement {min_agreement:.2%}")
    if max_accuracy_drop is not None:
        before, after = validation.reference.accuracy, validation.model.accuracy
        if before is None or after is None:
            raise UsageError("--max-accuracy-drop needs labels in the validation data")
        if before - after > max_accuracy_drop:
            failures.append(
                f"accuracy dropped by {(before - after) * 100:.2f} points, more than "
                f"--max-accuracy-drop {max_accuracy_drop * 100:.2f}"
            )
    return CompressResult(
        output=str(output),
        plan=plan,
        removed_fraction=outcome.removed_fraction,
        repair=repair,
        repaired_sinks=len(repaired.repaired),
        provider=stats.provider,
        equivalence=equivalence,
        validation=validation,
        gate_failures=tuple(failures),
        group_channels={gid: (len(kept), groups[gid].channels) for gid, kept in plan.keep.items()},
        finetune=finetuned,
    )
