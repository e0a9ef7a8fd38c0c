"""Spline Early-Bird on the sample MNIST CNN: when the ticket is drawn, and what pruning at the ticket costs and buys.

One dense training run of ``samples.mnist_net`` from scratch (samples/mnist_train.npz, the recipe of
samples/train_mnist.py: AdamW, one-cycle over --epochs, batch 128, +-2 px shifts) with two detectors on:

- spline EB: codes of a fixed probe batch (the first 256 images of samples/mnist_calib.npz) at every ReLU input,
  distance to each of the previous 3 epochs, ticket when all are below 0.16;
- EB tickets (baseline): global |BN gamma| masks at ratio --ratio, ticket when the last 5 masks are within 0.1.

Then three flows, all pruning --ratio of the channels of every prunable group (layer scope), with the channels
chosen by our ONNX pipeline (export -> analyze_groups -> calibrate on the 500 calib images -> score -> make_plan)
and applied in torch as channel masks (forward hooks zeroing the pruned channels at each source's BatchNorm
output, which is exactly the pruned network):

- dense: the E-epoch dense run, no pruning.
- EB (spline): the dense run's state (weights, optimizer, LR schedule) at the spline ticket epoch t, pruned by the
  spline criterion, then trained masked for the remaining E - t epochs of the same one-cycle schedule.
- EB-tickets (BN): the same from the mask ticket epoch, channels chosen by |BN gamma| (score "bn").
- classic: the E-epoch dense model, pruned by the spline criterion, then fine-tuned masked for --finetune-epochs
  (fresh AdamW, one-cycle, peak LR --finetune-lr).

Training cost is counted in dense-epoch equivalents: each epoch costs the forward MACs of the network it trains
(1 for dense, the slim model's MACs / dense MACs once pruned; MACs of the ONNX models before and after surgery),
since forward and backward both scale with them. Wall times are measured but masked training does not run faster
in torch (the zeroed channels are still computed): only the MACs column shows the saving a physically pruned
network would get.

    python benchmarks/earlybird.py                  # about 3-6 minutes on 2 CPU cores

Not a test: it prints measured numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from samples.mnist_net import INPUT_SHAPE, build_mnist_net  # noqa: E402
from samples.train_mnist import random_shift, seed_everything, torch_accuracy  # noqa: E402
from splinecompress.calib.calibrate import calibrate  # noqa: E402
from splinecompress.calib.runner import create_session  # noqa: E402
from splinecompress.criteria import CriterionInput, score  # noqa: E402
from splinecompress.earlybird import MaskEarlyBird, SplineEarlyBird  # noqa: E402
from splinecompress.export import export_model  # noqa: E402
from splinecompress.graph.groups import analyze_groups  # noqa: E402
from splinecompress.graph.surgery import apply_plan  # noqa: E402
from splinecompress.model import load_model  # noqa: E402
from splinecompress.policy import make_plan  # noqa: E402

SAMPLES = REPO / "samples"


class Trainer:
    """Model, AdamW and a one-cycle schedule over ``epochs``; ``snapshot`` copies all three."""

    def __init__(self, model: nn.Module, epochs: int, steps_per_epoch: int, lr: float) -> None:
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch
        )

    def snapshot(self) -> Trainer:
        # One deepcopy of all three keeps the optimizer pointing at the copied parameters and the schedule at
        # the copied optimizer.
        return copy.deepcopy(self)


def train_epoch(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, batch: int, gen: torch.Generator) -> float:
    model, loss_fn = trainer.model, nn.CrossEntropyLoss(label_smoothing=0.05)
    model.train()
    start = time.perf_counter()
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), batch):
        idx = perm[i : i + batch]
        loss = loss_fn(model(random_shift(x[idx], gen)), y[idx])
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()
        trainer.opt.step()
        trainer.sched.step()
    return time.perf_counter() - start


def source_batchnorms(model: nn.Module) -> dict[str, str]:
    """Conv module name -> the BatchNorm2d registered right after it (conv1 -> bn1, shortcut.0 -> shortcut.1)."""
    names = [(n, m) for n, m in model.named_modules()]
    out = {}
    for i, (name, module) in enumerate(names):
        if isinstance(module, nn.Conv2d):
            following = next((n for n, m in names[i + 1 :] if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))), None)
            if following is not None and isinstance(dict(names)[following], nn.BatchNorm2d):
                out[name] = following
    return out


def torch_module_name(onnx_node: str) -> str:
    """The torch module an exported node came from: "/stages/stages.1/shortcut/shortcut.0/Conv" ->
    "stages.1.shortcut.0" (the exporter's scopes repeat the parent's name before a Sequential index)."""
    parts = onnx_node.strip("/").split("/")[:-1]
    name, previous = "", ""
    for part in parts:
        if previous and part.startswith(previous + "."):
            name = name[: len(name) - len(previous)] + part
        else:
            name = f"{name}.{part}" if name else part
        previous = part
    return name


def choose_masks(
    model: nn.Module, calib: np.ndarray, ratio: float, criterion: str, work: Path
) -> tuple[dict[str, torch.Tensor], float, object]:
    """Prune ``ratio`` of every group by ``criterion`` via the ONNX pipeline; return BN-name -> keep-mask,
    the MACs fraction kept, and the slim ONNX model (to check that the masks equal surgery)."""
    path = work / f"{criterion}.onnx"
    export_model(copy.deepcopy(model), path, INPUT_SHAPE, keep_batchnorm=criterion == "bn")
    onnx_model = load_model(path)
    groups = analyze_groups(onnx_model)
    stats = calibrate(onnx_model, groups, [{"input": calib}], batch_size=250, device="cpu", show_progress=False)
    scores = score(criterion, CriterionInput(onnx_model, groups, stats))
    if scores.skipped:
        print(f"note: criterion {criterion} left groups whole: {scores.skipped}")
    plan = make_plan(onnx_model, groups, scores, ratio=ratio)
    slim = apply_plan(onnx_model, plan.plan, groups)
    bn_of = source_batchnorms(model)
    modules = dict(model.named_modules())
    masks: dict[str, torch.Tensor] = {}
    for gid, kept in plan.plan.pruned_groups(groups).items():
        group = groups[gid]
        for source in group.sources:
            conv = torch_module_name(source)
            if conv not in bn_of:
                raise RuntimeError(f"{group.label}: source {source} maps to no torch conv+BN ({conv})")
            # The source's weight member maps group channels to output channels (offset 0, stride 1 for a Conv).
            member = next(m for m in group.members if m.role == "source" and m.node == source and m.input == 1)
            mask = torch.zeros(modules[bn_of[conv]].num_features)
            mask[torch.from_numpy(member.indices(kept))] = 1.0
            masks[bn_of[conv]] = mask
    return masks, slim.macs_after / slim.macs_before, slim.model


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    modules = dict(model.named_modules())

    def hook(mask: torch.Tensor):
        return lambda module, inputs, output: output * mask.view(1, -1, 1, 1)

    return [modules[name].register_forward_hook(hook(mask)) for name, mask in masks.items()]


def surgery_agreement(model: nn.Module, slim, x: np.ndarray) -> float:
    """Top-1 agreement of the masked torch model with the surgically pruned ONNX model."""
    model.eval()
    with torch.no_grad():
        torch_top = model(torch.from_numpy(x)).argmax(1).numpy()
    onnx_top = create_session(slim, device="cpu").run({"input": x}, ["logits"])[0].argmax(1)
    return float((torch_top == onnx_top).mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--finetune-epochs", type=int, default=None, help="classic flow (default: E - spline ticket)")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=SAMPLES / "out")
    args = p.parse_args(argv)
    seed_everything(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="eb_bench_"))

    with np.load(SAMPLES / "mnist_train.npz") as d:
        x_train, y_train = torch.from_numpy(d["input"]), torch.from_numpy(d["labels"])
    with np.load(SAMPLES / "mnist_val.npz") as d:
        x_val, y_val = torch.from_numpy(d["input"]), torch.from_numpy(d["labels"])
    with np.load(SAMPLES / "mnist_calib.npz") as d:
        calib = d["input"]
    probe = torch.from_numpy(calib[:256])
    steps = (len(x_train) + args.batch_size - 1) // args.batch_size
    gen = torch.Generator().manual_seed(args.seed)

    dense = Trainer(build_mnist_net(), args.epochs, steps, args.lr)
    spline_eb = SplineEarlyBird(dense.model, probe)
    mask_eb = MaskEarlyBird(dense.model, ratio=args.ratio)
    spline_eb.update(epoch=0)  # the random init, so epoch 1 has a distance too
    mask_eb.update(epoch=0)
    snapshots: dict[str, tuple[int, Trainer, torch.Generator]] = {}
    dense_time = 0.0
    print(
        f"{'epoch':>5} {'spline d':>9} {'max(3)':>7} {'mask d':>7} {'max(4)':>7} {'val':>7} {'train s':>7} {'EB s':>5}"
    )
    for epoch in range(1, args.epochs + 1):
        seconds = train_epoch(dense, x_train, y_train, args.batch_size, gen)
        dense_time += seconds
        start = time.perf_counter()
        s, m = spline_eb.update(epoch=epoch), mask_eb.update(epoch=epoch)
        detect = time.perf_counter() - start
        acc = torch_accuracy(dense.model, x_val, y_val)
        flags = ("  <- spline ticket" if s.ticket_epoch == epoch else "") + (
            "  <- mask ticket" if m.ticket_epoch == epoch else ""
        )
        print(
            f"{epoch:>5} {s.distances[0]:>9.4f} {s.max_distance:>7.4f} {m.distances[0]:>7.4f} "
            f"{m.max_distance:>7.4f} {acc:>7.4f} {seconds:>7.1f} {detect:>5.2f}{flags}",
            flush=True,
        )
        for name, detector in (("spline", spline_eb), ("bn", mask_eb)):
            if detector.ticket_epoch == epoch and epoch < args.epochs:
                snapshots[name] = (epoch, dense.snapshot(), torch.Generator().set_state(gen.get_state()))
    spline_eb.save_heatmap(args.out_dir / "earlybird_spline.png")
    mask_eb.save_heatmap(args.out_dir / "earlybird_mask.png")
    np.savez(
        args.out_dir / "earlybird_distances.npz", spline=spline_eb.distance_matrix(), mask=mask_eb.distance_matrix()
    )
    print(f"spline ticket epoch: {spline_eb.ticket_epoch}   EB-tickets (BN mask) ticket epoch: {mask_eb.ticket_epoch}")
    print(f"heat maps: {args.out_dir / 'earlybird_spline.png'}, {args.out_dir / 'earlybird_mask.png'}")

    E = args.epochs
    rows = [
        ("dense", "E dense epochs, no pruning", torch_accuracy(dense.model, x_val, y_val), float(E), dense_time, None)
    ]

    val_np = x_val.numpy()
    for name, criterion in (("spline", "spline"), ("bn", "bn")):
        if name not in snapshots:
            label = "EB (spline)" if name == "spline" else "EB-tickets (BN)"
            rows.append((label, "no ticket drawn before the last epoch", float("nan"), float("nan"), 0.0, None))
            continue
        t, trainer, run_gen = snapshots[name]
        masks, kept_macs, slim = choose_masks(trainer.model, calib, args.ratio, criterion, work)
        apply_masks(trainer.model, masks)
        agree = surgery_agreement(trainer.model, slim, val_np)
        seconds = sum(train_epoch(trainer, x_train, y_train, args.batch_size, run_gen) for _ in range(E - t))
        label = "EB (spline)" if name == "spline" else "EB-tickets (BN)"
        what = f"dense 1..{t}, prune by {criterion} at {t}, masked {t + 1}..{E} (same schedule)"
        wall = dense_time * t / E + seconds  # epochs 1..t are the dense run's (its mean epoch time)
        rows.append((label, what, torch_accuracy(trainer.model, x_val, y_val), t + (E - t) * kept_macs, wall, agree))

    finetune = args.finetune_epochs if args.finetune_epochs is not None else E - (spline_eb.ticket_epoch or E // 2)
    classic = copy.deepcopy(dense.model)
    masks, kept_macs, slim = choose_masks(classic, calib, args.ratio, "spline", work)
    apply_masks(classic, masks)
    agree = surgery_agreement(classic, slim, val_np)
    rows.append(
        (
            "classic, no FT",
            f"dense 1..{E}, prune by spline",
            torch_accuracy(classic, x_val, y_val),
            float(E),
            dense_time,
            agree,
        )
    )
    ft = Trainer(classic, max(finetune, 1), steps, args.finetune_lr)
    seconds = sum(train_epoch(ft, x_train, y_train, args.batch_size, gen) for _ in range(finetune))
    rows.append(
        (
            "classic",
            f"dense 1..{E}, prune by spline, fine-tune masked {finetune} epochs "
            f"(fresh one-cycle, peak LR {args.finetune_lr})",
            torch_accuracy(classic, x_val, y_val),
            E + finetune * kept_macs,
            dense_time + seconds,
            agree,
        )
    )

    print(f"\npruned: {args.ratio:.0%} of the channels of every prunable group; MACs kept {kept_macs:.3f} of dense")
    print(f"{'flow':<16} {'val acc':>7} {'cost (dense epochs)':>19} {'wall s':>7} {'mask=surgery':>12}  what it did")
    for label, what, acc, cost, wall, agree in rows:
        agree_s = f"{agree:.3f}" if agree is not None else "-"
        print(f"{label:<16} {acc:>7.4f} {cost:>19.2f} {wall:>7.1f} {agree_s:>12}  {what}")


if __name__ == "__main__":
    main()
