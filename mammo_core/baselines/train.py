"""Training one single-network baseline under the branches' protocol, resumable from a per-epoch checkpoint.

Same protocol as the Freeze1..3 branches (:mod:`mammo_core.training.loop`): the same data (augmented train
set, validation patches), the same input preparation (:func:`~mammo_core.training.loop.prepare_images`), the
same batch order (one seeded generator, :func:`~mammo_core.training.loop.epoch_batches`), the same schedule
(:class:`~mammo_core.training.schedule.Schedule`: SGD, step decay, warm-up, roll-back to the best validation
weights every ``rollback_every`` epochs) and the same checkpoint contract (:mod:`mammo_core.training.checkpoint`:
weights, optimizer, scheduler, RNG states, best-so-far and history, written atomically after every
epoch; a rerun continues after the last completed epoch and ends where an uninterrupted run would).

Frozen prefix cached, as the branches' trunk is (``cached`` mode of :mod:`mammo_core.training.loop`): each
network's shallow layers are frozen (:data:`~mammo_core.baselines.networks.FROZEN_PREFIX`, eval mode)
and the augmented training set is fixed, so the prefix output of every training and validation patch
is the same in every epoch. It is computed once (:func:`prefix_outputs`, fp32, in memory, in chunks of
the batch size) and each batch trains only the rest of the network from the cached rows.

Why a loop of its own: the branch loop works on the shared-trunk models' branch views; a torchvision
network is one module whose InceptionV3 variant may return auxiliary logits, so the loop here handles
that head and the network's own prefix/rest cut.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mammo_core.baselines.networks import AUX_LOSS_WEIGHT, SingleNetClassifier
from mammo_core.runtime import stop_request
from mammo_core.training.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    capture_rng,
    check_same_architecture,
    load_safely,
    restore_rng,
    save_atomic,
)
from mammo_core.training.loop import (
    TensorData,
    TrainingDiverged,
    check_training_sets,
    epoch_batches,
    prepare_images,
)
from mammo_core.training.schedule import Schedule, make_optimizer, make_scheduler


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of one network (1-based ``epoch``), as ``val_curves.json`` stores it (plus lr, seconds)."""

    epoch: int
    train_loss: float
    val_acc: float
    lr: float
    seconds: float
    rolled_back: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BaselineTrainResult:
    """``model`` holds the best-validation weights (eval mode)."""

    model: SingleNetClassifier
    history: list[EpochRecord]
    best_epoch: int
    best_val_acc: float
    resumed_from_epoch: int
    cache_seconds: float = 0.0
    cached: dict[str, Tensor] = field(default_factory=dict)  # "train"/"val" prefix outputs, when computed


def predict(model: SingleNetClassifier, data: TensorData, *, batch_size: int = 64,
            device: torch.device | str | None = None) -> np.ndarray:
    """Class probabilities (N, C) float32 in eval and inference mode, in chunks of ``batch_size``."""
    return read_out(model, data, batch_size=batch_size, device=device)[0]


def extract_features(model: SingleNetClassifier, data: TensorData, *, batch_size: int = 64,
                     device: torch.device | str | None = None) -> np.ndarray:
    """Pooled penultimate features (N, feature_dim) float32, eval and inference mode."""
    return read_out(model, data, batch_size=batch_size, device=device)[1]


def read_out(model: SingleNetClassifier, data: TensorData, *, batch_size: int = 64,
             device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities (N, C), pooled features (N, feature_dim)) from one eval-mode pass."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return read_out_prefix(model, prefix_outputs(model, data, batch_size, device), batch_size=batch_size)


def prefix_outputs(model: SingleNetClassifier, data: TensorData, chunk: int,
                   device: torch.device | str) -> Tensor:
    """The frozen prefix's output for every row of ``data`` (fp32, on ``device``), computed in chunks.

    In inference mode with the prefix's convolutions in channels-last layout (about a quarter fewer CPU
    seconds for VGG16 and ResNet50's prefixes on two cores, issue 18; the same function up to float
    rounding); the result is an ordinary contiguous tensor, so the trainable rest reads it as before.
    """
    device = torch.device(device)
    model.to(device)
    model.prefix_to_channels_last()
    with torch.inference_mode():
        outputs = [model.prefix(prepare_images(data.images[s:s + chunk], device).contiguous(
            memory_format=torch.channels_last)) for s in range(0, len(data), chunk)]
    if not outputs:
        return torch.zeros((0, 1), device=device)
    # Outside inference mode: a normal tensor that autograd may save (the rest's first layer needs it).
    return torch.cat(outputs).contiguous()


def read_out_prefix(model: SingleNetClassifier, cached: Tensor, *,
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities, pooled features) in eval and inference mode from cached prefix outputs."""
    was_training = model.training
    model.eval()
    probabilities: list[Tensor] = []
    features: list[Tensor] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(cached), batch_size):
                f, logits = model.features_and_logits_from_prefix(cached[start:start + batch_size])
                probabilities.append(torch.softmax(logits.float(), dim=1).cpu())
                features.append(f.float().cpu())
    finally:
        model.train(was_training)
    if not probabilities:
        return np.zeros((0, model.num_classes), np.float32), np.zeros((0, model.feature_dim), np.float32)
    return torch.cat(probabilities).numpy(), torch.cat(features).numpy()


def _accuracy(model: SingleNetClassifier, cached: Tensor, labels: Tensor, batch_size: int) -> float:
    if len(labels) == 0:
        return float("nan")
    proba = read_out_prefix(model, cached, batch_size=batch_size)[0]
    return float((proba.argmax(axis=1) == labels.numpy()).mean())


def _state_copy(model: SingleNetClassifier) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_baseline(
    model: SingleNetClassifier,
    train: TensorData,
    val: TensorData,
    schedule: Schedule,
    *,
    checkpoint_dir: str | Path,
    class_names: list[str],
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> BaselineTrainResult:
    """Train ``model``'s trainable rest from its cached frozen prefix; resume from ``checkpoint_dir/checkpoint.pt``.

    ``on_epoch`` sees each epoch after its checkpoint is written; ``on_batch(epoch, batch)`` runs before
    each training batch (fault injection in tests).
    """
    check_training_sets(train, val, model.num_classes, class_names)
    device = schedule.resolve_device()
    model.to(device)
    generator = torch.Generator().manual_seed(schedule.seed)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], schedule)
    scheduler = make_scheduler(optimizer, schedule)
    best_epoch, best_acc, best_state = 0, float("-inf"), _state_copy(model)
    history: list[EpochRecord] = []
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    start = 0
    if path.exists():
        saved = load_safely(path, device)
        check_same_architecture(path, saved["model"], model.state_dict())
        for key, value in schedule.fingerprint().items():
            if saved["schedule"].get(key) != value:
                raise ValueError(f"{path}: checkpoint was trained with {key}={saved['schedule'].get(key)!r}, "
                                 f"now {value!r}; use a fresh checkpoint folder to change it")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        restore_rng(saved["rng"], generator)
        best_epoch, best_acc = int(saved["best"]["epoch"]), float(saved["best"]["val_acc"])
        best_state = saved["best"]["state"] if saved["best"]["state"] is not None else _state_copy(model)
        history = [EpochRecord(**d) for d in saved["history"]]
        start = int(saved["epoch"])

    cached: dict[str, Tensor] = {}
    cache_seconds = 0.0
    if start < schedule.epochs:
        began = time.perf_counter()
        cached = {"train": prefix_outputs(model, train, schedule.batch_size, device),
                  "val": prefix_outputs(model, val, schedule.batch_size, device)}
        cache_seconds = time.perf_counter() - began
    for epoch in range(start, schedule.epochs):
        began = time.perf_counter()
        model.train()
        lr = float(optimizer.param_groups[0]["lr"])
        loss_sum, seen = 0.0, 0
        batches = epoch_batches(len(train), schedule.batch_size, generator)
        for i, idx in enumerate(batches):
            stop_request.check(f"baseline training epoch {epoch + 1}")  # between batches: checkpoints stay valid
            if on_batch is not None:
                on_batch(epoch + 1, i)
            y = train.labels[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            logits, aux = model.training_logits_from_prefix(cached["train"][idx.to(device)])
            loss = F.cross_entropy(logits, y)
            if aux is not None:
                loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(aux, y)
            if not torch.isfinite(loss):
                raise TrainingDiverged(model.network, epoch + 1, path if path.exists() else None)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
        scheduler.step()
        val_acc = _accuracy(model, cached["val"], val.labels, schedule.batch_size)
        if val_acc > best_acc:
            best_epoch, best_acc, best_state = epoch + 1, val_acc, _state_copy(model)
        rolled = schedule.is_rollback_epoch(epoch) and best_acc > val_acc
        if rolled:  # as the branches do: back to the best weights, momentum of the abandoned path dropped
            model.load_state_dict(best_state)
            optimizer.state.clear()
        record = EpochRecord(epoch + 1, loss_sum / max(seen, 1), val_acc, lr, time.perf_counter() - began, rolled)
        history.append(record)
        # The best weights are stored only when they differ from the current ones (halves the file otherwise).
        best_is_current = best_epoch == epoch + 1 and not rolled
        save_atomic({
            "format": FORMAT_VERSION,
            "network": model.network,
            "epoch": epoch + 1,
            "schedule": schedule.fingerprint(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": capture_rng(generator),
            "best": {"epoch": best_epoch, "val_acc": best_acc, "state": None if best_is_current else best_state},
            "history": [r.to_dict() for r in history],
        }, path)
        if on_epoch is not None:
            on_epoch(record)
    model.load_state_dict(best_state)
    model.eval()
    return BaselineTrainResult(model, history, best_epoch, best_acc, start, cache_seconds, cached)
