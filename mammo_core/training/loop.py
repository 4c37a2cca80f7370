"""Training the Freeze1..3 branches: shared trunk, cached trunk, or three separate trainings.

Modes (all give every branch its own SGD optimizer over its trainable parameters only):

- ``shared``: one process, all branches per batch. The prefix frozen in every branch (the model's
  ``trunk``) runs once per batch without a graph; each branch runs forward/backward from its output.
- ``cached``: the augmented training set is fixed (materialised by the augment stage) and the trunk is
  frozen, so the trunk output of every training (and validation) patch is the same each epoch, and so
  is each branch's output after its own frozen segments (Freeze1 and Freeze2 freeze more than the
  trunk). Those are computed once (fp32, in memory, or in a scratch HDF5 beyond ``cache_max_bytes``)
  and each branch trains only its trainable part from them. In fp32 this is the same arithmetic as
  ``shared`` on the same batches, so both end with identical weights for the same seed (tested with
  ``torch.equal`` on CPU).
- ``separate`` (:func:`train_separate`): one independent training per single-branch model, for
  comparison and for spreading the branches over devices. With ``cache_frozen`` each network's frozen
  prefix is cached as in ``cached``: the same weights, without recomputing frozen layers every epoch.

Batch order comes from one seeded ``torch.Generator`` shared by all branches, so the modes see the same
batches. Every epoch ends with validation (eval mode, inference mode), the best-so-far weights per
branch, the paper's roll-back rule, and an atomic checkpoint holding everything a rerun needs to end
bit-identical to an uninterrupted run (weights, optimizers, schedulers, RNG states, best-so-far,
history). A kill mid-epoch loses only that epoch: the rerun resumes after the last completed one.

Input preparation (:func:`prepare_images`): uint8 patches become floats in [0, 1], are repeated to 3
channels and normalised with ImageNet's mean and std. Why: the backbone is (or may be) initialised from
ImageNet weights, whose first convolution and BN statistics expect RGB inputs distributed like
ImageNet's; feeding the grey patch as three equal channels with the same normalisation keeps the
pretrained features meaningful. With random initialisation it is harmless.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mammo_core.models.fused import FusedDenseNet, SingleBranchDenseNet, global_average_pool
from mammo_core.runtime import faults, stop_request
from mammo_core.storage import h5io
from mammo_core.storage.durable import atomic_path
from mammo_core.training.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    capture_rng,
    check_same_architecture,
    load_with_fallback,
    restore_rng,
    save_atomic,
)
from mammo_core.training.checkpoint import exists as checkpoint_exists
from mammo_core.training.schedule import Schedule, make_optimizer, make_scheduler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CACHE_MAX_BYTES = 2 << 30  # on the CPU, beyond this the trunk cache goes to a scratch HDF5 file
CUDA_CACHE_SHARE = 0.5  # on a GPU, the cache may take this share of the device's free memory
TRUNK_CACHE_NAME = "trunk_cache.h5"
Mode = Literal["shared", "cached", "separate"]
BranchModel = FusedDenseNet | SingleBranchDenseNet


class TrainingDiverged(RuntimeError):
    """A branch's loss became NaN or infinite; the last good checkpoint (previous epoch) is kept."""

    def __init__(self, branch: str, epoch: int, checkpoint: Path | None):
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no epoch had completed yet"
        super().__init__(
            f"branch {branch!r} diverged in epoch {epoch}: non-finite training loss; training stopped, {kept}. "
            f"Lower the learning rate or check the inputs."
        )
        self.branch = branch
        self.epoch = epoch
        self.checkpoint = checkpoint


# ----------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class TensorData:
    """Patches in memory: ``images`` uint8 (N, 1, S, S), ``labels`` int64 (N,)."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 1:
            raise ValueError(f"images must be uint8 (N, 1, S, S), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError(f"labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


def load_tensor_data(path: str | os.PathLike[str], split: int | None = None) -> TensorData:
    """Read ``images``/``labels`` (optionally the rows whose ``split`` code matches) from a patches HDF5.

    Missing datasets, wrong dtypes or shapes, and unreadable files are a ValueError naming the file.
    """
    path = Path(path)
    try:
        with h5io.open_for_reading(path) as fh:
            needed = ["images", "labels"] + (["split"] if split is not None else [])
            missing = [n for n in needed if n not in fh]
            if missing:
                raise ValueError(f"{path}: dataset {missing[0]!r} missing (file holds {sorted(fh)})")
            if split is None:
                images, labels = fh["images"][:], fh["labels"][:]
            else:
                rows = np.flatnonzero(fh["split"][:] == split)
                images, labels = fh["images"][rows] if len(rows) else fh["images"][:0], fh["labels"][rows]
    except OSError as exc:
        raise ValueError(f"{path}: unreadable HDF5 ({exc})") from exc
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"{path}: /images must be uint8 (N, 1, S, S), got {images.dtype} {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),):
        raise ValueError(f"{path}: /labels must be integers, one per image, got {labels.dtype} {labels.shape}")
    return TensorData(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


def check_training_classes(labels: Tensor, num_classes: int, class_names: Sequence[str]) -> None:
    """ValueError when a label is out of range or a class has no training sample (its name is given)."""
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {num_classes} classes")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"training labels outside [0, {num_classes}): {sorted(set(labels.tolist()))[:10]}")
    counts = torch.bincount(labels, minlength=num_classes)
    empty = [f"{class_names[k]!r} (label {k})" for k in range(num_classes) if counts[k] == 0]
    if empty:
        raise ValueError(f"no training samples for class {', '.join(empty)}: every class needs some")


def check_training_sets(train: TensorData, val: TensorData, num_classes: int, class_names: Sequence[str]) -> None:
    """ValueError unless every class has training samples, there are at least two, and val is not empty."""
    check_training_classes(train.labels, num_classes, class_names)
    if len(train) < 2:
        raise ValueError(f"{len(train)} training sample(s): at least 2 are needed")
    if len(val) == 0:
        raise ValueError("the validation set is empty: best-epoch selection and roll-back need it")


def prepare_images(images: Tensor, device: torch.device | str) -> Tensor:
    """uint8 (N, 1, S, S) -> float32 (N, 3, S, S) in ImageNet normalisation, on ``device``."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """One shuffled pass; a trailing batch of one sample is dropped (train-mode BN cannot use it)."""
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if batches and len(batches[-1]) == 1 and n > 1:
        batches.pop()
    return batches


class _Gather(torch.utils.data.Dataset):
    """Indexes a whole batch at once (the sampler yields index tensors)."""

    def __init__(self, data: TensorData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return idx, self.data.images[idx], self.data.labels[idx]


def _iter_batches(data: TensorData, batches: list[Tensor], workers: int, pin: bool) -> Iterable[tuple[Tensor, ...]]:
    if workers == 0:
        return (_Gather(data)[idx] for idx in batches)
    return torch.utils.data.DataLoader(
        _Gather(data), sampler=batches, batch_size=None, num_workers=workers, pin_memory=pin
    )


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# ----------------------------------------------------------------------------------------------
# What the loop needs from a model


class _Net:
    """Branch view of a fused or single model: trainable parts, per-branch logits, branch states."""

    def __init__(self, model: BranchModel):
        if isinstance(model, FusedDenseNet):
            self.parts = {b: nn.ModuleList([model.branches[b], model.heads[b]]) for b in model.branches}
        elif isinstance(model, SingleBranchDenseNet):
            self.parts = {model.name: nn.ModuleList([model.continuation, model.head])}
        else:
            raise TypeError(f"cannot train a {type(model).__name__}: expected FusedDenseNet or SingleBranchDenseNet")
        self.model = model
        self.frozen: dict[str, list[nn.Module]] = {}  # leading frozen segments of each continuation
        self.frozen_names: dict[str, list[str]] = {}
        self.rest: dict[str, list[nn.Module]] = {}
        for b, (continuation, _) in self.parts.items():
            named = list(continuation.named_children())
            k = 0
            while k < len(named) and not any(p.requires_grad for p in named[k][1].parameters()):
                k += 1
            self.frozen_names[b] = [name for name, _ in named[:k]]
            self.frozen[b], self.rest[b] = [m for _, m in named[:k]], [m for _, m in named[k:]]

    @property
    def branches(self) -> list[str]:
        return list(self.parts)

    def logits(self, branch: str, trunk_out: Tensor) -> Tensor:
        continuation, head = self.parts[branch]
        return head(global_average_pool(continuation(trunk_out)))

    def frozen_output(self, branch: str, trunk_out: Tensor) -> Tensor:
        """The trunk output carried through the branch's own frozen segments (fixed, hence cacheable)."""
        with torch.no_grad():
            for module in self.frozen[branch]:
                trunk_out = module(trunk_out)
        return trunk_out

    def frozen_source(self, branch: str) -> tuple[str, int] | None:
        """Another branch whose frozen segments are a leading part of ``branch``'s, and how many they are.

        Why: Freeze1 freezes everything Freeze2 freezes and more (same segments, same unchanging
        weights), so Freeze1's frozen output is Freeze2's carried through the few extra segments:
        computing it from there runs each frozen layer once instead of once per branch. The longest such
        prefix is chosen; segments count only when their names and every weight and buffer are equal, so
        the result is bit-identical to :meth:`frozen_output`.
        """
        best: tuple[str, int] | None = None
        mine = self.frozen_names[branch]
        for other in self.branches:
            theirs = self.frozen_names[other]
            if other == branch or not theirs or len(theirs) >= len(mine) or mine[: len(theirs)] != theirs:
                continue
            if best is not None and len(theirs) <= best[1]:
                continue
            if all(_same_state(a, b) for a, b in zip(self.frozen[branch], self.frozen[other], strict=False)):
                best = (other, len(theirs))
        return best

    def frozen_output_from(self, branch: str, source_out: Tensor, start: int) -> Tensor:
        """:meth:`frozen_output` given the output of the branch's first ``start`` frozen segments."""
        with torch.no_grad():
            for module in self.frozen[branch][start:]:
                source_out = module(source_out)
        return source_out

    def logits_after_frozen(self, branch: str, frozen_out: Tensor) -> Tensor:
        """Same as :meth:`logits` given :meth:`frozen_output` (the continuation is a plain sequence)."""
        h = frozen_out
        for module in self.rest[branch]:
            h = module(h)
        return self.parts[branch][1](global_average_pool(h))

    def trainable(self, branch: str) -> list[nn.Parameter]:
        return [p for p in self.parts[branch].parameters() if p.requires_grad]

    def branch_state(self, branch: str) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.parts[branch].state_dict().items()}

    def load_branch_state(self, branch: str, state: Mapping[str, Tensor]) -> None:
        self.parts[branch].load_state_dict(state)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------
# Trunk cache


def read_rows(dataset: h5py.Dataset, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of ``dataset``, in that order, read one row (one chunk of the cache) at a time.

    Why not ``dataset[sorted idx]``: h5py turns a list of indices into a point selection that HDF5 walks
    element by element; 32 rows of 1.6 MB took 0.63 s that way against 0.02 s for one 32-row slice, and a
    batch reads three such sets (``bench/trunk_cache_read.py``). A row slice per index reads each chunk whole.
    """
    out = np.empty((len(idx), *dataset.shape[1:]), dtype=dataset.dtype)
    for j, i in enumerate(idx.tolist()):
        dataset.read_direct(out, source_sel=np.s_[i:i + 1], dest_sel=np.s_[j:j + 1])
    return out


class _FrozenCache:
    """Each branch's frozen output (trunk + the branch's own frozen segments) for a fixed dataset.

    Computed once, fp32, in memory or in a scratch HDF5 file beyond ``max_bytes``. A branch with no
    frozen segment of its own shares the plain trunk output. Rows are computed in sequential chunks of
    ``chunk`` (the chunks evaluation uses) and stored exactly as computed, so a batch read back holds the
    values the shared mode computes for it.
    """

    def __init__(self, model: BranchModel, net: _Net, data: TensorData, chunk: int, device: torch.device,
                 max_bytes: int, scratch: Path):
        self.device = device
        self.scratch = scratch
        self.file: h5py.File | None = None
        self.key = {b: (b if net.frozen[b] else "trunk") for b in net.branches}
        keys = sorted(set(self.key.values()))
        n = len(data)
        # Shortest frozen paths first, so a branch can start from another's output (each frozen layer once).
        order = sorted((k for k in keys if k != "trunk"), key=lambda k: len(net.frozen[k]))
        sources = {k: net.frozen_source(k) for k in order}

        def compute(s: slice) -> dict[str, Tensor]:
            stop_request.check("the frozen-trunk cache")
            with torch.inference_mode():
                out = {"trunk": model.trunk_output(prepare_images(data.images[s], device))}
                for k in order:
                    source = sources[k]
                    out[k] = (net.frozen_output(k, out["trunk"]) if source is None
                              else net.frozen_output_from(k, out[source[0]], source[1]))
            return {k: out[k] for k in keys}

        shapes = {k: tuple(v.shape[1:]) for k, v in compute(slice(0, 1)).items()}
        nbytes = n * sum(int(np.prod(shape)) for shape in shapes.values()) * 4
        if nbytes <= max_bytes:
            self.memory = {k: torch.empty((n, *shape), dtype=torch.float32, device=device)
                           for k, shape in shapes.items()}
            for s in _chunks(n, chunk):
                for k, v in compute(s).items():
                    self.memory[k][s] = v
            return
        self.memory = {}
        with atomic_path(scratch) as tmp, h5py.File(tmp, "w") as fh:
            rows = {k: fh.create_dataset(k, (n, *shape), dtype="f4", chunks=(1, *shape))
                    for k, shape in shapes.items()}
            for s in _chunks(n, chunk):
                for k, v in compute(s).items():
                    rows[k][s] = v.cpu().numpy()
        self.file = h5io.open_for_reading(scratch)

    def get(self, branch: str, idx: Tensor) -> Tensor:
        key = self.key[branch]
        if self.file is None:
            return self.memory[key][idx.to(self.device)]
        return torch.from_numpy(read_rows(self.file[key], idx.numpy())).to(self.device)

    def slice(self, branch: str, s: slice) -> Tensor:
        key = self.key[branch]
        if self.file is None:
            return self.memory[key][s]
        return torch.from_numpy(self.file[key][s]).to(self.device)

    def close(self) -> None:
        self.memory = {}
        if self.file is not None:
            self.file.close()
            self.file = None
            self.scratch.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class EpochReport:
    epoch: int  # 1-based
    train_loss: dict[str, float]
    val_acc: dict[str, float]
    lr: dict[str, float]
    seconds: float  # training + validation of this epoch (the trunk cache is built once, outside)
    rolled_back: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rolled_back": list(self.rolled_back)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpochReport:
        return cls(**{**d, "rolled_back": tuple(d.get("rolled_back", ()))})


@dataclass
class TrainResult:
    """Best epoch (1-based) and best validation accuracy per branch; ``model`` holds the best weights."""

    mode: str
    best_epoch: dict[str, int]
    best_val_acc: dict[str, float]
    history: list[EpochReport]
    model: nn.Module
    resumed_from_epoch: int = 0
    trunk_cache_seconds: float = 0.0
    checkpoint: Path | None = None


@dataclass
class Evaluation:
    predictions: np.ndarray  # int64 (N,)
    probabilities: np.ndarray  # float32 (N, C)
    accuracy: float
    confusion: np.ndarray  # int64 (C, C): rows true class, columns predicted class


@dataclass
class _Best:
    epoch: int
    val_acc: float
    state: dict[str, Tensor] = field(repr=False)


# ----------------------------------------------------------------------------------------------
# Evaluation


def _logits_by_chunks(net: _Net, trunk_chunks: Iterable[Tensor]) -> Iterator[dict[str, Tensor]]:
    for t in trunk_chunks:
        yield {b: net.logits(b, t) for b in net.branches}


def _concat_logits(net: _Net, chunk_logits: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    out: dict[str, list[Tensor]] = {b: [] for b in net.branches}
    for logits in chunk_logits:
        for b in net.branches:
            out[b].append(logits[b].float().cpu())
    return {b: torch.cat(v) if v else torch.empty(0, net.model.num_classes) for b, v in out.items()}


def _trunk_chunks(model: BranchModel, data: TensorData, chunk: int, device: torch.device) -> Iterator[Tensor]:
    for s in _chunks(len(data), chunk):
        yield model.trunk_output(prepare_images(data.images[s], device))


def evaluate(
    model: BranchModel, data: TensorData, *, batch_size: int = 64, device: torch.device | str | None = None
) -> dict[str, Evaluation]:
    """Per-branch predictions, class probabilities, accuracy and confusion matrix (numpy) on ``data``."""
    net = _Net(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits = _concat_logits(net, _logits_by_chunks(net, _trunk_chunks(model, data, batch_size, device)))
    finally:
        model.train(was_training)
    truth = data.labels.numpy()
    c = model.num_classes
    result = {}
    for b, z in logits.items():
        probs = torch.softmax(z, dim=1).numpy().astype(np.float32)
        pred = z.argmax(dim=1).numpy().astype(np.int64)
        confusion = np.bincount(truth * c + pred, minlength=c * c).reshape(c, c).astype(np.int64)
        accuracy = float((pred == truth).mean()) if len(truth) else float("nan")
        result[b] = Evaluation(pred, probs, accuracy, confusion)
    return result


def _accuracies(net: _Net, labels: Tensor, chunk_logits: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    net.model.eval()
    try:
        with torch.inference_mode():
            logits = _concat_logits(net, chunk_logits)
    finally:
        net.model.train()
    if not len(labels):
        return {b: float("nan") for b in net.branches}
    return {b: float((z.argmax(1) == labels).double().mean()) for b, z in logits.items()}


# ----------------------------------------------------------------------------------------------
# Training


def train_branches(
    model: FusedDenseNet,
    train: TensorData,
    val: TensorData,
    schedule: Schedule,
    *,
    mode: Literal["shared", "cached"] = "shared",
    checkpoint_dir: str | os.PathLike[str],
    class_names: Sequence[str],
    on_epoch: Callable[[EpochReport], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    cache_max_bytes: int | None = None,
) -> TrainResult:
    """Train every branch of ``model`` in one process (``shared`` or ``cached`` trunk); resumes if checkpointed.

    ``on_epoch`` sees each epoch's report after its checkpoint is written; ``on_batch(epoch, batch)``
    runs before each training batch (progress, fault injection in tests). ``cache_max_bytes``: the most
    the cached trunk may hold in memory (None: :func:`cache_budget_bytes` of the device). Returns the best
    weights.
    """
    if not isinstance(model, FusedDenseNet):
        raise TypeError(f"train_branches needs a FusedDenseNet, got {type(model).__name__}")
    if mode not in ("shared", "cached"):
        raise ValueError(f"mode must be 'shared' or 'cached', got {mode!r}")
    return _fit(model, train, val, schedule, mode, Path(checkpoint_dir), class_names, on_epoch, on_batch,
                cache_max_bytes, cache_frozen=mode == "cached")


def train_separate(
    singles: Mapping[str, SingleBranchDenseNet],
    train: TensorData,
    val: TensorData,
    schedule: Schedule,
    *,
    checkpoint_dir: str | os.PathLike[str],
    class_names: Sequence[str],
    on_epoch: Callable[[str, EpochReport], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    cache_frozen: bool = False,
    cache_max_bytes: int | None = None,
) -> dict[str, TrainResult]:
    """Three independent trainings (mode ``separate``), one after the other, each in ``checkpoint_dir/<branch>``.

    Each uses its own generator seeded like the shared modes, so all modes see the same batch order.
    To spread the branches over devices, call this once per branch with a one-entry mapping.

    ``cache_frozen``: compute each network's frozen prefix once, as the ``cached`` mode does for the fused
    model. Why: a separate network's frozen layers see the same fixed patches every epoch too, so running
    them again each epoch is work without effect; on an H200 it made each branch of a paper-sized run take
    72-79 s against 14 s for all three on the cached shared trunk. Same arithmetic, same weights (tested).
    """
    results = {}
    for name, single in singles.items():
        if not isinstance(single, SingleBranchDenseNet):
            raise TypeError(f"{name}: train_separate needs SingleBranchDenseNet models, got {type(single).__name__}")
        if single.name != name:
            raise ValueError(f"single model named {single.name!r} given as branch {name!r}")
        report = (lambda r, n=name: on_epoch(n, r)) if on_epoch else None
        results[name] = _fit(single, train, val, schedule, "separate", Path(checkpoint_dir) / name, class_names,
                             report, on_batch, cache_max_bytes, cache_frozen=cache_frozen)
    return results


def cache_budget_bytes(device: torch.device) -> int:
    """How many bytes the frozen-trunk cache may hold in memory on ``device`` before it goes to disk.

    Why per device: the cache lives where training runs. On a GPU that is device memory, of which an H200
    has 139 GiB; a host-sized 2 GiB limit sent the paper-sized cache (710 patches of 224 px: 2.2 GB) to a
    scratch HDF5 file there, and the shared-trunk epoch took 45-53 s instead of seconds. So on a GPU the
    limit is a share of its free memory (the model, its gradients and activations keep the rest); on the
    CPU it stays 2 GiB.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_CACHE_SHARE)
    return DEFAULT_CACHE_MAX_BYTES


def _fit(
    model: BranchModel,
    train: TensorData,
    val: TensorData,
    schedule: Schedule,
    mode: Mode,
    checkpoint_dir: Path,
    class_names: Sequence[str],
    on_epoch: Callable[[EpochReport], None] | None,
    on_batch: Callable[[int, int], None] | None,
    cache_max_bytes: int | None,
    *,
    cache_frozen: bool,
) -> TrainResult:
    check_training_sets(train, val, model.num_classes, class_names)
    device = schedule.resolve_device()
    if cache_max_bytes is None:
        cache_max_bytes = cache_budget_bytes(device)
    model.to(device)
    model.train()
    net = _Net(model)
    generator = torch.Generator().manual_seed(schedule.seed)
    optimizers = {b: make_optimizer(net.trainable(b), schedule) for b in net.branches}
    schedulers = {b: make_scheduler(optimizers[b], schedule) for b in net.branches}
    best = {b: _Best(0, float("-inf"), net.branch_state(b)) for b in net.branches}
    history: list[EpochReport] = []
    path = checkpoint_dir / CHECKPOINT_NAME
    start = 0
    if checkpoint_exists(path):
        start = _resume(path, model, net, schedule, optimizers, schedulers, best, history, generator, device)

    cache: _FrozenCache | None = None
    val_cache: _FrozenCache | None = None
    cache_seconds = 0.0
    eval_chunk = schedule.batch_size
    try:
        if cache_frozen and start < schedule.epochs:
            began = time.perf_counter()
            model.train()  # the frozen parts are in eval mode whatever the model's mode
            cache = _FrozenCache(model, net, train, eval_chunk, device, cache_max_bytes,
                                 checkpoint_dir / TRUNK_CACHE_NAME)
            val_cache = _FrozenCache(model, net, val, eval_chunk, device, cache_max_bytes,
                                     checkpoint_dir / f"val_{TRUNK_CACHE_NAME}")
            cache_seconds = time.perf_counter() - began
        for epoch in range(start, schedule.epochs):
            report = _run_epoch(epoch, model, net, train, val, schedule, optimizers, schedulers, best, generator,
                                device, cache, val_cache, eval_chunk, path, on_batch)
            history.append(report)
            _save(path, mode, model, net, schedule, optimizers, schedulers, best, history, generator, epoch + 1)
            if on_epoch is not None:
                on_epoch(report)
    finally:
        for c in (cache, val_cache):
            if c is not None:
                c.close()
    for b in net.branches:
        net.load_branch_state(b, best[b].state)
    return TrainResult(
        mode=mode,
        best_epoch={b: best[b].epoch for b in net.branches},
        best_val_acc={b: best[b].val_acc for b in net.branches},
        history=history,
        model=model,
        resumed_from_epoch=start,
        trunk_cache_seconds=cache_seconds,
        checkpoint=path,
    )


def _run_epoch(
    epoch: int,
    model: BranchModel,
    net: _Net,
    train: TensorData,
    val: TensorData,
    schedule: Schedule,
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    best: dict[str, _Best],
    generator: torch.Generator,
    device: torch.device,
    cache: _FrozenCache | None,
    val_cache: _FrozenCache | None,
    eval_chunk: int,
    path: Path,
    on_batch: Callable[[int, int], None] | None,
) -> EpochReport:
    began = time.perf_counter()
    model.train()
    lrs = {b: float(optimizers[b].param_groups[0]["lr"]) for b in net.branches}
    loss_sums = {b: torch.zeros((), dtype=torch.float64, device=device) for b in net.branches}
    batches = epoch_batches(len(train), schedule.batch_size, generator)
    workers = 0 if cache is not None else schedule.num_workers
    for i, (idx, images, labels) in enumerate(_iter_batches(train, batches, workers, device.type == "cuda")):
        stop_request.check(f"training epoch {epoch + 1}")  # between batches: the last checkpoint stays valid
        faults.at("train:batch")
        if on_batch is not None:
            on_batch(epoch + 1, i)
        t = None if cache is not None else model.trunk_output(prepare_images(images, device))
        y = labels.to(device, non_blocking=True)
        for b in net.branches:
            optimizers[b].zero_grad(set_to_none=True)
            logits = net.logits(b, t) if cache is None else net.logits_after_frozen(b, cache.get(b, idx))
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise TrainingDiverged(b, epoch + 1, path if path.exists() else None)
            loss.backward()
            optimizers[b].step()
            loss_sums[b] += loss.detach().double() * len(y)
    for b in net.branches:
        schedulers[b].step()
    seen = sum(len(idx) for idx in batches)
    if val_cache is not None:
        chunks = (
            {b: net.logits_after_frozen(b, val_cache.slice(b, s)) for b in net.branches}
            for s in _chunks(len(val), eval_chunk)
        )
    else:
        chunks = _logits_by_chunks(net, _trunk_chunks(model, val, eval_chunk, device))
    val_acc = _accuracies(net, val.labels, chunks)
    for b in net.branches:
        if val_acc[b] > best[b].val_acc:
            best[b] = _Best(epoch + 1, val_acc[b], net.branch_state(b))
    rolled = []
    if schedule.is_rollback_epoch(epoch):
        for b in net.branches:
            if best[b].val_acc > val_acc[b]:
                # Momentum from the abandoned trajectory would push straight back towards it: reset it.
                net.load_branch_state(b, best[b].state)
                optimizers[b].state.clear()
                rolled.append(b)
    return EpochReport(
        epoch=epoch + 1,
        train_loss={b: float(loss_sums[b]) / seen for b in net.branches},
        val_acc=val_acc,
        lr=lrs,
        seconds=time.perf_counter() - began,
        rolled_back=tuple(rolled),
    )


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _save(path: Path, mode: Mode, model: BranchModel, net: _Net, schedule: Schedule,
          optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any],
          best: Mapping[str, _Best], history: list[EpochReport], generator: torch.Generator, epoch: int) -> None:
    save_atomic(
        {
            "format": FORMAT_VERSION,
            "mode": mode,
            "epoch": epoch,
            "branches": net.branches,
            "schedule": schedule.fingerprint(),
            "model": model.state_dict(),
            "optimizers": {b: o.state_dict() for b, o in optimizers.items()},
            "schedulers": {b: s.state_dict() for b, s in schedulers.items()},
            "rng": capture_rng(generator),
            "best": {b: {"epoch": v.epoch, "val_acc": v.val_acc, "state": v.state} for b, v in best.items()},
            "history": [r.to_dict() for r in history],
        },
        path,
        keep_previous=True,
    )


def _resume(path: Path, model: BranchModel, net: _Net, schedule: Schedule,
            optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any],
            best: dict[str, _Best], history: list[EpochReport], generator: torch.Generator,
            device: torch.device) -> int:
    """Restore everything from the checkpoint at ``path`` (or the previous one, if ``path`` is unreadable);
    returns the number of completed epochs."""
    saved, path = load_with_fallback(path, device)
    check_same_architecture(path, saved["model"], model.state_dict())
    if list(saved["branches"]) != net.branches:
        raise ValueError(f"{path}: checkpoint has branches {list(saved['branches'])}, the model {net.branches}")
    expected = schedule.fingerprint()
    for key, value in expected.items():
        if saved["schedule"].get(key) != value:
            raise ValueError(
                f"{path}: checkpoint was trained with {key}={saved['schedule'].get(key)!r}, now {value!r}; "
                f"use a fresh checkpoint folder to change it"
            )
    model.load_state_dict(saved["model"])
    for b in net.branches:
        optimizers[b].load_state_dict(saved["optimizers"][b])
        schedulers[b].load_state_dict(saved["schedulers"][b])
        entry = saved["best"][b]
        best[b] = _Best(int(entry["epoch"]), float(entry["val_acc"]), entry["state"])
    restore_rng(saved["rng"], generator)
    history.extend(EpochReport.from_dict(d) for d in saved["history"])
    return int(saved["epoch"])
