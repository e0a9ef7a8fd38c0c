"""Fine-tune a slim ONNX model by knowledge distillation from the original: ONNX in, ONNX out.

At high pruning ratios no training-free repair recovers the accuracy; fine-tuning does. Users often hold only
ONNX files, so everything here needs just the two models and unlabeled calibration-style data (labels optional):

1. the slim model becomes a trainable torch module (:func:`onnx_to_torch`);
2. the original (the teacher) runs once through onnxruntime over the training data; its outputs are the soft
   targets of a temperature-scaled KL loss (times T^2, Hinton et al.), plus cross-entropy where labels exist;
3. the trained module goes back to ONNX through our exporter (:func:`export_like`), which checks torch/ONNX
   parity, with the slim model's input/output names and its dynamic batch.

Converter: onnx2torch (ENOT-AutoDL, Apache-2.0, pure Python, 1.5.15 of August 2024, "Production/Stable"). It
converts the sample, its slim models and the torchvision zoo exactly (ONNX -> torch -> ONNX gives the same
outputs), Conv/Gemm/BatchNormalization become ordinary torch modules whose weights are ``nn.Parameter``, and it
covers far more ops than a converter of our own would. Two gaps are closed here: it stores constants that feed
arithmetic (``MatMul`` weights, ``Add`` biases) as buffers, which would silently freeze them, so such float
constants are promoted to parameters; and its "not implemented" errors name no node, so unsupported ops are
found up front and reported by node name.

The training set is held in memory (calibration-style data: thousands of samples, not millions) so that it can
be shuffled every epoch; the teacher's outputs are computed once, since the teacher never changes. torch is
imported lazily: the rest of splinecompress works without it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from splinecompress._optional import require_torch
from splinecompress.calib.data import CalibrationData
from splinecompress.calib.runner import create_session
from splinecompress.errors import CalibrationDataError, UnsupportedGraphError, UsageError
from splinecompress.export import ExportResult, export_model
from splinecompress.model import TensorSpec, input_specs, load_model, output_specs
from splinecompress.progress import progress

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "DEFAULT_TEMPERATURE",
    "EPOCH_HEADER",
    "EpochStats",
    "FinetuneResult",
    "epoch_rows",
    "export_like",
    "finetune",
    "onnx_to_torch",
]

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 10
DEFAULT_LR = 3e-3
DEFAULT_BATCH_SIZE = 64
DEFAULT_TEMPERATURE = 4.0
# Weight of the cross-entropy term when labels exist; the distillation term gets 1 - alpha.
DEFAULT_ALPHA = 0.5
# One torch thread: the student is small, and on a shared machine OpenMP threads that wait for a busy core make
# training 10-25x slower (measured on the MNIST sample with 2 threads on 2 shared cores); raise it on a free box.
DEFAULT_THREADS = 1

# ONNX ops whose constant float inputs are weights worth training (onnx2torch keeps them as buffers).
_WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Add", "Sub", "Mul", "PRelu"})


@dataclass(frozen=True)
class EpochStats:
    """One epoch of fine-tuning. Epoch 0 is the model before training (no loss).

    Attributes:
        epoch: 1-based epoch number (0: before training).
        loss: mean total loss over the epoch's samples (None for epoch 0).
        distill_loss: mean distillation (KL * T^2) loss (None for epoch 0).
        ce_loss: mean cross-entropy loss (None without labels or for epoch 0).
        val_accuracy: top-1 accuracy of the first output on the validation data (None: no labelled val data).
        val_agreement: top-1 agreement with the teacher on the validation data (None: no val data).
        seconds: wall time of the epoch's training.
    """

    epoch: int
    loss: float | None
    distill_loss: float | None
    ce_loss: float | None
    val_accuracy: float | None
    val_agreement: float | None
    seconds: float


@dataclass(frozen=True)
class FinetuneResult:
    """What ``finetune`` did: the file written, the settings, per-epoch numbers and the export's parity."""

    output: str
    student: str
    teacher: str
    samples: int
    labelled: bool
    epochs: int
    lr: float
    batch_size: int
    temperature: float
    alpha: float
    seed: int
    trainable_parameters: int
    history: tuple[EpochStats, ...]
    train_seconds: float
    export_max_abs_diff: float
    teacher_val_accuracy: float | None = None

    @property
    def val_accuracy_before(self) -> float | None:
        return self.history[0].val_accuracy if self.history else None

    @property
    def val_accuracy_after(self) -> float | None:
        return self.history[-1].val_accuracy if self.history else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


# -- ONNX -> torch ----------------------------------------------------------------------------------------------



def _require_onnx2torch():
    try:
        import onnx2torch
        from onnx2torch.node_converters import get_converter
        from onnx2torch.onnx_graph import OnnxGraph
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UsageError(
            "fine-tuning needs onnx2torch to turn ONNX into torch: install it with  pip install 'splinecompress[torch]'"
        ) from e
    return onnx2torch, get_converter, OnnxGraph


def _load(model: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    return load_model(model) if isinstance(model, str | os.PathLike) else model


def onnx_to_torch(model: onnx.ModelProto | str | os.PathLike[str]) -> torch.nn.Module:
    """Turn an ONNX model into a trainable torch module (a ``torch.fx.GraphModule`` built by onnx2torch).

    Weights of Conv, ConvTranspose, Gemm and BatchNormalization are ``nn.Parameter`` (BatchNormalization's running
    statistics are buffers); float constants feeding MatMul/Gemm/Add/Sub/Mul/PRelu are promoted from buffers to
    parameters so that they train too. The module returns one tensor for a one-output model, a list otherwise, in
    the order of the graph's outputs.

    Args:
        model: a ModelProto or the path of an .onnx file.

    Returns:
        The module, in eval mode.

    Raises:
        ModelLoadError: the file cannot be read or fails the checker.
        UnsupportedGraphError: a node's op (or an attribute of it) has no torch conversion; the message names
            the op, its domain and opset, and the node.
    """
    require_torch("fine-tuning")
    onnx2torch, get_converter, onnx_graph_cls = _require_onnx2torch()
    model = _unshare_initializers(_load(model))
    opsets = {o.domain or "": o.version for o in model.opset_import}
    graph = onnx_graph_cls(model.graph)
    # Check every node first: onnx2torch's own error names the op but not the node.
    for name, node in graph.nodes.items():
        version = opsets.get(node.domain, opsets.get("", 0))
        try:
            get_converter(operation_type=node.operation_type, version=version, domain=node.domain)
        except NotImplementedError as e:
            domain = node.domain or "ai.onnx"
            raise UnsupportedGraphError(
                f"node '{node.name or name}' ({domain} {node.operation_type}, opset {version}) cannot be turned into "
                "torch for fine-tuning: onnx2torch has no converter for it (see its list of supported operations)"
            ) from e
    try:
        module = onnx2torch.convert(model, attach_onnx_mapping=True)
    except (NotImplementedError, ValueError, KeyError, RuntimeError) as e:
        raise UnsupportedGraphError(_locate_conversion_error(model, graph, opsets, get_converter, e)) from e
    promoted = _promote_constant_weights(module, {n: node.operation_type for n, node in graph.nodes.items()})
    if promoted:
        log.info("onnx_to_torch: %d constant tensor(s) made trainable", promoted)
    return module.eval()


def _unshare_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where every node input reads its own initializer.

    Exporters store equal constants once (all-zero biases of BN-folded convs, say), sometimes behind Identity
    nodes; onnx2torch fails on both (a Conv bias must be an initializer), and training should not tie tensors
    that are only equal by chance anyway.
    """
    copy = type(model)()
    copy.CopyFrom(model)
    _fold_constant_identities(copy)
    inits = {t.name: t for t in copy.graph.initializer}
    seen: set[str] = set()
    added = []
    for node in copy.graph.node:
        for i, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in seen:
                tensor = type(inits[name])()
                tensor.CopyFrom(inits[name])
                tensor.name = f"{name}__{node.name or node.op_type}_{i}_{len(added)}"
                added.append(tensor)
                node.input[i] = tensor.name
            seen.add(name)
    copy.graph.initializer.extend(added)
    return copy


def _fold_constant_identities(model: onnx.ModelProto) -> None:
    """Replace each ``Identity(initializer)`` that is not a graph output by an initializer of its own (in place)."""
    inits = {t.name: t for t in model.graph.initializer}
    outputs = {v.name for v in model.graph.output}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            tensor = type(inits[node.input[0]])()
            tensor.CopyFrom(inits[node.input[0]])
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            inits[tensor.name] = tensor
        else:
            keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)
        # value_info of the folded outputs would now describe initializers; drop them
        names = {t.name for t in model.graph.initializer}
        kept_info = [v for v in model.graph.value_info if v.name not in names]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept_info)


def _locate_conversion_error(model, graph, opsets, get_converter, error: Exception) -> str:
    """Name the first node whose converter fails (onnx2torch raises without saying where)."""
    for name, node in graph.nodes.items():
        version = opsets.get(node.domain, opsets.get("", 0))
        try:
            get_converter(operation_type=node.operation_type, version=version, domain=node.domain)(node, graph)
        except Exception as e:  # any converter failure: this is the node to name
            return (
                f"node '{node.name or name}' ({node.operation_type}) cannot be turned into torch for fine-tuning: "
                f"{str(e).strip() or type(e).__name__}"
            )
    return f"the model cannot be turned into torch for fine-tuning: {str(error).strip() or type(error).__name__}"


def _promote_constant_weights(module: torch.nn.Module, op_types: dict[str, str]) -> int:
    """Turn float constant buffers read by weight-like ops into parameters; return how many were promoted."""
    torch = require_torch("fine-tuning")
    container = getattr(module, "initializers", None)
    if container is None:
        return 0
    wanted: set[str] = set()
    for fx_node in module.graph.nodes:
        if fx_node.op != "call_module" or op_types.get(fx_node.target) not in _WEIGHT_OPS:
            continue
        for arg in fx_node.args:
            target = getattr(arg, "target", None)
            if getattr(arg, "op", None) == "get_attr" and str(target).startswith("initializers."):
                wanted.add(str(target).split(".", 1)[1])
    promoted = 0
    for name in sorted(wanted):
        buffer = container._buffers.get(name)
        # Scalars are usually fixed constants (HardSwish's 1/6, a normalisation factor); leave them.
        if buffer is None or not torch.is_floating_point(buffer) or buffer.numel() <= 1:
            continue
        del container._buffers[name]
        container.register_parameter(name, torch.nn.Parameter(buffer.detach().clone()))
        promoted += 1
    return promoted


# -- torch -> ONNX ----------------------------------------------------------------------------------------------


def export_like(
    module: torch.nn.Module,
    reference: onnx.ModelProto | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    sample_shape: tuple[int, ...] | None = None,
) -> ExportResult:
    """Export ``module`` through our exporter so that it looks like ``reference`` from outside.

    Same input and output names, the same opset (at least 7), a symbolic batch when the reference's is symbolic,
    and BatchNormalization nodes kept when the reference has them (so an untrained round trip gives the same
    graph and the same numbers). Written atomically, only after the parity check passes.

    Args:
        module: the torch module (e.g. from :func:`onnx_to_torch`); it is put in eval mode.
        reference: the ONNX model whose interface to copy.
        output: the .onnx file to write.
        sample_shape: the input shape to trace with, batch first; needed when a non-batch dimension of the
            reference's input is symbolic.

    Returns:
        The exporter's ExportResult (parity error included).

    Raises:
        UsageError: the reference has more than one input, a non-float32 input, or symbolic non-batch dimensions
            and no ``sample_shape``.
        ExportError: torch cannot export the module, or ONNX disagrees with torch.
    """
    reference = _load(reference)
    inputs, outputs = input_specs(reference), output_specs(reference)
    spec = _single_float_input(inputs, "export")
    shape = sample_shape or spec.shape
    if shape is None or any(not isinstance(d, int) for d in shape[1:]):
        raise UsageError(
            f"input '{spec.name}' has shape {spec.shape_text()}: its non-batch dimensions must be fixed to export, "
            "or pass sample_shape"
        )
    dynamic = spec.shape is None or not isinstance(spec.shape[0], int)
    batch = 1 if dynamic else spec.shape[0]  # a fixed batch stays what the reference says
    opset = next((o.version for o in reference.opset_import if o.domain in ("", "ai.onnx")), 17)
    return export_model(
        module,
        output,
        (batch, *shape[1:]),
        input_names=(spec.name,),
        output_names=tuple(o.name for o in outputs),
        dynamic_batch=dynamic,
        opset=min(max(opset, 7), 23),
        keep_batchnorm=any(n.op_type == "BatchNormalization" for n in reference.graph.node),
    )


def _single_float_input(inputs: tuple[TensorSpec, ...], what: str) -> TensorSpec:
    if len(inputs) != 1:
        raise UsageError(
            f"{what} supports models with exactly one input; this one has {len(inputs)}: {[s.name for s in inputs]}"
        )
    spec = inputs[0]
    if spec.dtype != np.float32:
        raise UsageError(f"{what}: input '{spec.name}' is {spec.dtype}, only float32 inputs are supported")
    return spec


# -- data -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dataset:
    inputs: np.ndarray
    labels: np.ndarray | None
    targets: tuple[np.ndarray, ...]  # the teacher's outputs, one array per output


def _read_with_teacher(data: Any, specs: tuple[TensorSpec, ...], teacher, role: str) -> _Dataset:
    """Read ``data`` into memory and run the teacher over it once (fixed-batch padding rows dropped)."""
    name = specs[0].name
    rows, labels, targets = [], [], None
    for batch in CalibrationData(data, specs, role=role):
        rows.append(batch.feeds[name][: batch.valid])
        if batch.labels is not None:
            labels.append(batch.labels[: batch.valid])
        outputs = teacher.run(batch.feeds)
        targets = [[] for _ in outputs] if targets is None else targets
        for store, out in zip(targets, outputs, strict=True):
            store.append(np.asarray(out[: batch.valid], dtype=np.float32))
    return _Dataset(
        inputs=np.concatenate(rows).astype(np.float32, copy=False),
        labels=np.concatenate(labels).astype(np.int64) if labels else None,
        targets=tuple(np.concatenate(t) for t in targets or ()),
    )


def _check_pair(
    student: onnx.ModelProto, teacher: onnx.ModelProto, student_name: str, teacher_name: str
) -> tuple[TensorSpec, ...]:
    """The teacher must take the student's inputs and give outputs of the same count and shapes."""
    s_in, t_in = input_specs(student), input_specs(teacher)
    _single_float_input(s_in, f"fine-tuning {student_name}")
    if [s.name for s in s_in] != [t.name for t in t_in]:
        raise UsageError(
            f"teacher {teacher_name} takes input(s) {[t.name for t in t_in]} but student {student_name} takes "
            f"{[s.name for s in s_in]}: distillation feeds both the same data, so the input names must match"
        )
    if _fixed_dims_differ(s_in[0], t_in[0]):
        raise UsageError(
            f"teacher {teacher_name} input '{t_in[0].name}' has shape {t_in[0].shape_text()} but student "
            f"{student_name} takes {s_in[0].shape_text()}: distillation feeds both the same data"
        )
    s_out, t_out = output_specs(student), output_specs(teacher)
    if len(s_out) != len(t_out):
        raise UsageError(
            f"teacher {teacher_name} has {len(t_out)} output(s) {[t.name for t in t_out]}, student {student_name} "
            f"has {len(s_out)} {[s.name for s in s_out]}: outputs are distilled by position, so the counts must match"
        )
    for s, t in zip(s_out, t_out, strict=True):
        if _fixed_dims_differ(s, t):
            raise UsageError(
                f"student output '{s.name}' has shape {s.shape_text()} but teacher output '{t.name}' has "
                f"{t.shape_text()}: the teacher must be the model the student was pruned from"
            )
    return s_in


# -- training ---------------------------------------------------------------------------------------------------


def _fixed_dims_differ(a: TensorSpec, b: TensorSpec) -> bool:
    """Ranks differ, or a non-batch dimension fixed in both differs."""
    if a.shape is None or b.shape is None:
        return False
    return len(a.shape) != len(b.shape) or any(
        isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a.shape[1:], b.shape[1:], strict=True)
    )


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    torch = require_torch("fine-tuning")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _as_list(out) -> list:
    return list(out) if isinstance(out, list | tuple) else [out]


def _distill_loss(torch, student_out, teacher_out, temperature: float):
    """KL(teacher || student) on softened class scores (axis 1), times T^2; MSE for outputs of rank < 2."""
    if student_out.dim() < 2:
        return torch.nn.functional.mse_loss(student_out, teacher_out)
    log_p = torch.nn.functional.log_softmax(student_out / temperature, dim=1)
    log_q = torch.nn.functional.log_softmax(teacher_out / temperature, dim=1)
    # Sum over classes, mean over every other position (batch and spatial): "batchmean" for rank 2.
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()
    return kl * temperature * temperature


def _set_train_mode(module, freeze_bn: bool) -> None:
    torch = require_torch("fine-tuning")
    module.train()
    if freeze_bn:
        # Small fine-tuning batches give noisy statistics; the original's running statistics are better.
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def _evaluate(torch, module, data: _Dataset, batch_size: int) -> tuple[float | None, float]:
    """(accuracy of the first output against labels or None, top-1 agreement with the teacher)."""
    module.eval()
    correct = agree = total = 0
    with torch.no_grad():
        for start in range(0, len(data.inputs), batch_size):
            x = torch.from_numpy(data.inputs[start : start + batch_size])
            pred = _as_list(module(x))[0].argmax(dim=1).numpy()
            teacher = data.targets[0][start : start + batch_size].argmax(axis=1)
            agree += int(np.sum(pred == teacher))
            if data.labels is not None:
                correct += int(np.sum(pred == data.labels[start : start + batch_size]))
            total += len(pred)
    return (correct / total if data.labels is not None else None), agree / total


def finetune(
    student: str | os.PathLike[str],
    teacher: str | os.PathLike[str],
    data: Any,
    output: str | os.PathLike[str],
    *,
    val: Any = None,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
    weight_decay: float = 0.0,
    freeze_bn: bool = True,
    seed: int = 0,
    threads: int | None = DEFAULT_THREADS,
    device: str = "auto",
    show_progress: bool | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FinetuneResult:
    """Fine-tune the slim ONNX model ``student`` by distillation from ``teacher`` and write it to ``output``.

    The loss is ``(1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T)) + alpha * CE(s, labels)`` on every
    output's axis 1 (the class axis; MSE for outputs of rank < 2), cross-entropy on the first output only and only
    when the data has labels (otherwise the loss is distillation alone). Adam with a cosine learning-rate decay
    to zero over all steps; the samples are reshuffled each epoch by a numpy generator seeded with ``seed``, and
    ``torch.manual_seed(seed)`` fixes dropout, so a run repeats exactly on the same machine.

    Args:
        student: the slim .onnx file.
        teacher: the original .onnx file it was pruned from (same input names, outputs of the same shapes).
        data: training data in any form calibration accepts (``.npz``, folder, reader, iterable of feed dicts);
            labels optional. It is read into memory.
        output: where the fine-tuned model goes (written atomically; it may be ``student`` itself).
        val: validation data, evaluated before training and after each epoch (accuracy needs labels).
        epochs: passes over the training data (0 re-exports the untrained model).
        lr: peak learning rate of Adam.
        batch_size: samples per step (a fixed batch dimension of the student overrides it).
        temperature: softening temperature T of the distillation loss.
        alpha: weight of the cross-entropy term when labels exist, in [0, 1].
        weight_decay: Adam's (decoupled) weight decay.
        freeze_bn: keep BatchNormalization running statistics as they are (BN scale and shift still train).
        seed: seed of the shuffling and of torch.
        threads: torch threads while training (restored afterwards; None leaves torch's setting).
        device: onnxruntime device of the teacher ("auto", "cpu", "cuda"); the student trains on the CPU.
        show_progress: draw a progress line per epoch on stderr (None: when stderr is a terminal).
        on_epoch: called with each EpochStats as it is made (epoch 0 included), e.g. to print a table live.

    Returns:
        The FinetuneResult.

    Raises:
        ModelLoadError: a model cannot be read or fails the checker.
        UsageError: bad settings; the teacher takes other inputs or gives other outputs than the student; the
            student has several inputs or a non-float input.
        UnsupportedGraphError: the student holds an op that cannot be converted to torch.
        CalibrationDataError: the data does not fit the models or its labels are out of range.
        ExportError: the trained module does not export faithfully.
    """
    _check_settings(epochs, lr, batch_size, temperature, alpha, weight_decay, threads)
    torch = require_torch("fine-tuning")
    student_model, teacher_model = load_model(student), load_model(teacher)
    specs = _check_pair(student_model, teacher_model, str(student), str(teacher))
    fixed = specs[0].shape[0] if specs[0].shape and isinstance(specs[0].shape[0], int) else None
    if fixed is not None and fixed != batch_size:
        log.info("student %s has a fixed batch of %d: batch size %d is ignored", student, fixed, batch_size)
        batch_size = fixed
    module = onnx_to_torch(student_model)

    teacher_session = create_session(str(teacher), device=device)
    train = _read_with_teacher(data, input_specs(teacher_model), teacher_session, "training")
    val_set = (
        None if val is None else _read_with_teacher(val, input_specs(teacher_model), teacher_session, "validation")
    )
    classes = train.targets[0].shape[1] if train.targets[0].ndim >= 2 else None
    for subset, role in ((train, "training"), (val_set, "validation")):
        if subset is not None and subset.labels is not None:
            _check_labels(subset.labels, classes, role)
    use_ce = train.labels is not None and train.targets[0].ndim == 2
    _check_student_outputs(torch, module, train, str(student))
    log.info(
        "finetune: %d training samples%s, %d epoch(s), teacher on %s",
        len(train.inputs),
        " with labels" if use_ce else "",
        epochs,
        teacher_session.provider,
    )

    history: list[EpochStats] = []

    def record(stats: EpochStats) -> None:
        history.append(stats)
        log.info(
            "finetune epoch %d: loss %s, val accuracy %s, agreement %s (%.1f s)",
            stats.epoch,
            "-" if stats.loss is None else f"{stats.loss:.4f}",
            "-" if stats.val_accuracy is None else f"{stats.val_accuracy:.2%}",
            "-" if stats.val_agreement is None else f"{stats.val_agreement:.2%}",
            stats.seconds,
        )
        if on_epoch is not None:
            on_epoch(stats)

    start_all = time.perf_counter()
    with _torch_threads(threads):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        trainable = [p for p in module.parameters() if p.requires_grad]
        if val_set is not None:
            acc, agree = _evaluate(torch, module, val_set, batch_size)
            record(EpochStats(0, None, None, None, acc, agree, 0.0))
        if epochs > 0 and not trainable:
            raise UsageError(f"student {student} has no trainable weights after conversion: nothing to fine-tune")
        if epochs > 0:
            steps_per_epoch = _steps(len(train.inputs), batch_size, fixed)
            if steps_per_epoch == 0:
                raise CalibrationDataError(
                    f"training data has {len(train.inputs)} samples, fewer than the fixed batch {fixed} of {student}"
                )
            optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
            for epoch in range(1, epochs + 1):
                t0 = time.perf_counter()
                sums = _train_epoch(
                    torch, module, optimizer, scheduler, train, rng, batch_size, fixed, temperature, alpha, use_ce,
                    freeze_bn, label=f"finetune epoch {epoch}/{epochs}", show_progress=show_progress,
                )  # fmt: skip
                seconds = time.perf_counter() - t0
                acc, agree = (None, None) if val_set is None else _evaluate(torch, module, val_set, batch_size)
                record(EpochStats(epoch, sums[0], sums[1], sums[2] if use_ce else None, acc, agree, seconds))
        train_seconds = time.perf_counter() - start_all
        module.eval()
        exported = export_like(module, student_model, output, sample_shape=(1, *train.inputs.shape[1:]))

    return FinetuneResult(
        output=str(output),
        student=str(student),
        teacher=str(teacher),
        samples=len(train.inputs),
        labelled=use_ce,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        temperature=temperature,
        alpha=alpha if use_ce else 0.0,
        seed=seed,
        trainable_parameters=sum(p.numel() for p in module.parameters() if p.requires_grad),
        history=tuple(history),
        train_seconds=train_seconds,
        export_max_abs_diff=exported.max_abs_diff,
        teacher_val_accuracy=None if val_set is None else _teacher_accuracy(val_set),
    )


def epoch_rows(result: FinetuneResult) -> list[tuple[str, ...]]:
    """Rows of a per-epoch table (header: :data:`EPOCH_HEADER`) for the CLI and the benchmark to render."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.2%}"

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    return [
        (
            str(h.epoch),
            num(h.loss),
            num(h.distill_loss),
            num(h.ce_loss),
            pct(h.val_accuracy),
            pct(h.val_agreement),
            f"{h.seconds:.1f}",
        )
        for h in result.history
    ]


EPOCH_HEADER = ("epoch", "loss", "distill", "CE", "val accuracy", "agreement", "seconds")


def _teacher_accuracy(data: _Dataset) -> float | None:
    if data.labels is None or data.targets[0].ndim != 2:
        return None
    return float(np.mean(data.targets[0].argmax(axis=1) == data.labels))


def _check_student_outputs(torch, module, data: _Dataset, name: str) -> None:
    """The converted student must give outputs of the teacher's shapes (checked on one sample, since declared
    output shapes are often missing)."""
    with torch.no_grad():
        outputs = _as_list(module.eval()(torch.from_numpy(data.inputs[:1])))
    got = [tuple(o.shape[1:]) for o in outputs]
    want = [tuple(t.shape[1:]) for t in data.targets]
    if got != want:
        raise UsageError(
            f"student {name} gives outputs of shapes {got} (batch left out) but the teacher gives {want}: "
            "distillation pairs outputs by position, so the teacher must be the model the student was pruned from"
        )


def _check_settings(epochs, lr, batch_size, temperature, alpha, weight_decay, threads) -> None:
    checks = (
        (epochs >= 0, f"epochs {epochs} must be 0 or more"),
        (lr > 0 and math.isfinite(lr), f"learning rate {lr} must be a positive number"),
        (batch_size >= 1, f"batch size {batch_size} must be at least 1"),
        (temperature > 0 and math.isfinite(temperature), f"temperature {temperature} must be positive"),
        (0 <= alpha <= 1, f"alpha {alpha} is out of range [0, 1]"),
        (weight_decay >= 0, f"weight decay {weight_decay} must be 0 or more"),
        (threads is None or threads >= 1, f"threads {threads} must be at least 1"),
    )
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def _check_labels(labels: np.ndarray, classes: int | None, role: str) -> None:
    if classes is None:
        raise CalibrationDataError(
            f"{role} data has labels but the first output is not [batch, classes] scores: drop the labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise CalibrationDataError(
            f"{role} data: labels range {labels.min()}..{labels.max()} but the model has {classes} classes "
            f"(labels must be class indices 0..{classes - 1})"
        )


def _steps(samples: int, batch_size: int, fixed: int | None) -> int:
    # A fixed-batch model cannot take a short last batch: it is dropped (the next epoch's shuffle covers it).
    return samples // batch_size if fixed is not None else math.ceil(samples / batch_size)


def _train_epoch(
    torch, module, optimizer, scheduler, data: _Dataset, rng, batch_size, fixed, temperature, alpha, use_ce,
    freeze_bn, *, label: str, show_progress: bool | None,
) -> tuple[float, float, float]:  # fmt: skip
    """One pass in a fresh random order; returns the sample-weighted mean (total, distillation, CE) losses."""
    _set_train_mode(module, freeze_bn)
    order = rng.permutation(len(data.inputs))
    steps = _steps(len(order), batch_size, fixed)
    totals = np.zeros(3)
    seen = 0
    for step in progress(range(steps), label, total=steps, enabled=show_progress):
        index = order[step * batch_size : (step + 1) * batch_size]
        x = torch.from_numpy(data.inputs[index])
        outputs = _as_list(module(x))
        distill = sum(
            _distill_loss(torch, out, torch.from_numpy(target[index]), temperature)
            for out, target in zip(outputs, data.targets, strict=True)
        )
        ce = torch.nn.functional.cross_entropy(outputs[0], torch.from_numpy(data.labels[index])) if use_ce else None
        loss = distill if ce is None else (1 - alpha) * distill + alpha * ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = len(index)
        totals += n * np.array([loss.item(), float(distill.detach()), 0.0 if ce is None else ce.item()])
        seen += n
    return tuple(float(v) for v in totals / max(seen, 1))  # type: ignore[return-value]
