"""Per-network sealed units: each trained baseline is cached on its own, so adding a network retrains nothing.

Layout: ``<store>/units/baselines/<unit_key>/`` with ``unit.json`` (history, best epoch, size, weights
tag, frozen layers and frozen/trainable parameter counts), ``outputs.h5`` (validation/test class
probabilities and the pooled features of every split, which the AGNet fusion reads, and of the patches'
own training split, which the Freeze3 + network fusion reads), optionally ``weights.pt`` (best weights,
``keep_weights``), and ``manifest.json`` written last. Units are produced and sealed with
:class:`mammo_core.storage.store.ArtifactStore`'s temporary folder + rename, so a unit folder without manifest
never exists.

The unit key hashes the network name, the settings that change its training (schedule, epochs,
weights, VGG classifier), the keys of the data it was trained on (augment, patches), the code that
trains it with its libraries' versions and the weights file it starts from, but not the list of
networks, the classic baselines or the latency settings: those change the stage, not what one network
learns.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from mammo_core.baselines import networks
from mammo_core.baselines import train as baseline_train
from mammo_core.baselines.agnet import FeatureSplits
from mammo_core.baselines.train import EpochRecord
from mammo_core.sources.weight_sources import resolved_source
from mammo_core.storage import code_closure, h5io
from mammo_core.storage.library_versions import library_versions
from mammo_core.storage.store import ArtifactStore, IntegrityError, stage_key, write_json_atomic
from mammo_core.storage.verified_files import VerifiedFiles
from mammo_core.training import checkpoint, schedule
from mammo_core.training import loop as training

log = logging.getLogger(__name__)

UNIT_STAGE = "baselines"
UNIT_FILE = "unit.json"
OUTPUTS_FILE = "outputs.h5"
WEIGHTS_FILE = "weights.pt"


class UnitStore(ArtifactStore):
    """An :class:`ArtifactStore` rooted at ``<store>/units`` instead of ``<store>/stages``."""

    def stage_dir(self, stage: str) -> Path:
        return self.root / "units" / stage


@dataclass
class NetworkOutcome:
    """What the stage needs from one trained network (read back identically from a reused unit)."""

    network: str
    history: list[EpochRecord]
    best_epoch: int
    best_val_acc: float
    val_probabilities: np.ndarray
    test_probabilities: np.ndarray
    features: FeatureSplits
    params_m: float
    weights: str  # "imagenet" | "none (random init)"
    input_size: int
    epochs: int
    patches_train_features: np.ndarray  # the (not augmented) train split of the patches: Freeze3 + X fusion
    frozen_layers: str
    frozen_params: int
    trainable_params: int
    resumed_from_epoch: int = 0
    unit_key: str = ""
    reused: bool = False


def unit_key(network: str, settings: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    """Content key of one network's unit (see the module docstring for what enters it).

    The code is this module's import closure (:mod:`mammo_core.storage.code_closure`) with its libraries'
    versions, and the ImageNet file the network would start from (its sha256, or ``random`` when the
    builder would fall back to random initialisation).
    """
    code = code_closure.closure(__name__, code_closure.project_root_of(__name__, __file__))
    weights_file = networks.imagenet_file(network) if settings.get("weights") == "imagenet" else None
    inputs = {"libraries": library_versions(code.third_party), "weights_source": resolved_source(weights_file)}
    return stage_key(f"{UNIT_STAGE}/{network}", code.digest(), {"network": network, **settings}, upstream, inputs)


def _write(folder: Path, outcome: NetworkOutcome, weights_state: Mapping[str, torch.Tensor] | None) -> None:
    write_json_atomic(folder / UNIT_FILE, {
        "network": outcome.network, "history": [r.to_dict() for r in outcome.history],
        "best_epoch": outcome.best_epoch, "best_val_acc": outcome.best_val_acc, "params_m": outcome.params_m,
        "weights": outcome.weights, "input_size": outcome.input_size, "epochs": outcome.epochs,
        "resumed_from_epoch": outcome.resumed_from_epoch, "frozen_layers": outcome.frozen_layers,
        "frozen_params": outcome.frozen_params, "trainable_params": outcome.trainable_params,
    })
    with h5py.File(folder / OUTPUTS_FILE, "w") as fh:
        fh.create_dataset("val/probabilities", data=outcome.val_probabilities)
        fh.create_dataset("test/probabilities", data=outcome.test_probabilities)
        for split in ("train", "val", "test"):
            fh.create_dataset(f"{split}/features", data=getattr(outcome.features, split))
        fh.create_dataset("patches_train/features", data=outcome.patches_train_features)
    if weights_state is not None:
        checkpoint.save_atomic(dict(weights_state), folder / WEIGHTS_FILE)


def read_unit(folder: Path) -> NetworkOutcome:
    """The outcome stored in a sealed unit folder; a missing file or key is a ValueError naming it."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / UNIT_FILE).read_text(encoding="utf-8"))
        with h5io.open_for_reading(folder / OUTPUTS_FILE) as fh:
            arrays = {k: fh[k][:] for k in ("val/probabilities", "test/probabilities", "train/features",
                                            "val/features", "test/features", "patches_train/features")}
        return NetworkOutcome(
            network=meta["network"], history=[EpochRecord(**d) for d in meta["history"]],
            best_epoch=int(meta["best_epoch"]), best_val_acc=float(meta["best_val_acc"]),
            val_probabilities=arrays["val/probabilities"], test_probabilities=arrays["test/probabilities"],
            features=FeatureSplits(arrays["train/features"], arrays["val/features"], arrays["test/features"]),
            params_m=float(meta["params_m"]), weights=meta["weights"], input_size=int(meta["input_size"]),
            epochs=int(meta["epochs"]), patches_train_features=arrays["patches_train/features"],
            frozen_layers=meta["frozen_layers"], frozen_params=int(meta["frozen_params"]),
            trainable_params=int(meta["trainable_params"]),
            resumed_from_epoch=int(meta.get("resumed_from_epoch", 0)),
            unit_key=folder.name, reused=True,
        )
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{folder}: unreadable baseline unit ({type(exc).__name__}: {exc})") from exc


def obtain_unit(store_root: str | Path, network: str, key: str,
                produce: Callable[[], tuple[NetworkOutcome, Mapping[str, torch.Tensor] | None]],
                *, params: Mapping[str, Any], upstream: Mapping[str, str]) -> NetworkOutcome:
    """The sealed unit for ``key`` if there is one and it matches its manifest, else ``produce()`` it, seal
    it and return it. A damaged unit is produced again and replaces the old folder: it is a cache inside
    the baselines stage, which ``--force baselines`` would not otherwise repair."""
    store = UnitStore(store_root)
    found = store.find(UNIT_STAGE, key)
    damaged = False
    if found is not None:
        verified = VerifiedFiles(store_root)
        try:
            store.verify(found, sha256_of=verified.sha256)
            return read_unit(found.path)
        except IntegrityError as exc:
            log.warning("baseline unit %s/%s is damaged, training it again: %s", network, key, exc)
            damaged = True
        finally:
            verified.save()
    outcome, weights_state = produce()
    tmp = store.begin(UNIT_STAGE, key)
    try:
        _write(tmp, outcome, weights_state)
        folder = store.seal(UNIT_STAGE, key, tmp, params={"network": network, **params}, upstream=upstream,
                            metrics={"best_val_acc": outcome.best_val_acc, "best_epoch": outcome.best_epoch},
                            mlflow_run_id=None, replace=damaged)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    outcome.unit_key = folder.key
    return outcome


@dataclass(frozen=True)
class BaselineData:
    """The branches' data: augmented train set, validation and test patches (and the patches' own train
    split, whose features the Freeze3 + network fusion fits on, as the features stage's probe does)."""

    train: training.TensorData
    val: training.TensorData
    test: training.TensorData
    class_names: list[str]
    patches_train: training.TensorData | None = None

    @property
    def patch_size(self) -> int:
        return int(self.train.images.shape[-1])


def rows_holding(data: training.TensorData, rows: training.TensorData) -> np.ndarray | None:
    """For each row of ``rows``, the index of a row of ``data`` with the same image bytes and label; None
    when one has none. The model is a fixed function of the image in eval mode, so such a row's read-out
    is that row's read-out (no second prefix pass over the patches' training split)."""
    where: dict[tuple[bytes, int], int] = {}
    for i, (image, label) in enumerate(zip(data.images.numpy(), data.labels.tolist(), strict=True)):
        where.setdefault((image.tobytes(), label), i)
    found = [where.get((image.tobytes(), label)) for image, label in
             zip(rows.images.numpy(), rows.labels.tolist(), strict=True)]
    if any(i is None for i in found):
        return None
    return np.asarray(found, dtype=np.int64)


def train_network(network: str, data: BaselineData, sched: schedule.Schedule, *, weights: str,
                  vgg_classifier: str, keep_weights: bool, checkpoint_dir: Path, freeze: str = "shallow",
                  on_epoch: Callable[[EpochRecord], None] | None = None,
                  on_batch: Callable[[int, int], None] | None = None,
                  ) -> tuple[NetworkOutcome, dict[str, torch.Tensor] | None]:
    """Build, train (resumable), and read out one network: probabilities and pooled features per split.

    The read-out reuses the prefix outputs training cached (train, val); test and the patches' train
    split go through the prefix once each.
    """
    model = networks.build_baseline(network, len(data.class_names), data.patch_size, weights=weights,
                                    vgg_classifier=vgg_classifier, freeze=freeze, seed=sched.seed)
    result = baseline_train.train_baseline(model, data.train, data.val, sched, checkpoint_dir=checkpoint_dir,
                                           class_names=data.class_names, on_epoch=on_epoch, on_batch=on_batch)
    trained, batch, device = result.model, sched.batch_size, sched.resolve_device()
    patches_train = data.patches_train if data.patches_train is not None else data.train

    def read(split: str, rows: training.TensorData) -> tuple[np.ndarray, np.ndarray]:
        cached = result.cached.get(split)
        if cached is None:
            cached = baseline_train.prefix_outputs(trained, rows, batch, device)
        return baseline_train.read_out_prefix(trained, cached, batch_size=batch)

    (_, f_train), (p_val, f_val), (p_test, f_test) = (read(s, getattr(data, s)) for s in ("train", "val", "test"))
    result.cached.clear()  # the prefix outputs (hundreds of MB at default sizes) go before the next network
    rows = rows_holding(data.train, patches_train)
    # The augmented set holds every original patch (copy 0): its features were just read out (issue 18).
    f_patches_train = f_train[rows] if rows is not None else read("patches_train", patches_train)[1]
    split = trained.parameter_split()
    outcome = NetworkOutcome(
        network=network, history=result.history, best_epoch=result.best_epoch, best_val_acc=result.best_val_acc,
        val_probabilities=p_val, test_probabilities=p_test, features=FeatureSplits(f_train, f_val, f_test),
        params_m=networks.parameter_millions(trained), weights=trained.weights_tag,
        input_size=trained.input_size, epochs=sched.epochs, patches_train_features=f_patches_train,
        frozen_layers=trained.frozen_prefix.label, frozen_params=split["frozen"],
        trainable_params=split["trainable"], resumed_from_epoch=result.resumed_from_epoch,
    )
    state = {k: v.detach().cpu() for k, v in trained.state_dict().items()} if keep_weights else None
    return outcome, state
