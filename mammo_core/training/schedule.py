"""The Freeze1..3 training schedule: optimiser settings, learning-rate steps, warm-up and roll-back.

Defaults are the paper's (DESIGN.md section 7): SGD, batch 32, momentum 0.9, weight decay 5e-4, 100
epochs, lr 0.01 divided by 10 every 20 epochs, warm-up at lr 1e-5 for the first 5 epochs, and every 5
epochs a roll-back to the best-validation weights when they beat the current ones.

Epoch numbering: epochs are 0-based in code (``lr_at(0)`` is the first epoch) and 1-based in reports.
The step decay counts absolute epochs (``lr / gamma ** (epoch // lr_step)``) so the paper's "divided by
10 every 20 epochs" holds literally at epochs 20, 40, ...; warm-up epochs simply override it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mammo_core.training import devices


@dataclass(frozen=True)
class Schedule:
    epochs: int = 100
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step: int = 20  # divide the lr by lr_gamma every lr_step epochs; 0 = never
    lr_gamma: float = 10.0
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    rollback_every: int = 5  # 0 = never roll back
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        # Ranges (epochs, batch, lr, warm-up, roll-back, workers) are the params schema's to check
        # (mammo_core.config.TrainParams); the device may also be a scheduler's ``cuda:N``, which the schema's
        # auto|cpu|cuda does not cover, so it is checked here.
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"schedule.device must be auto, cpu or cuda[:N], got {self.device!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | Any) -> Schedule:
        """Build from a params section (a mapping or an object with attributes); unknown keys are ignored.

        Why ignored: the train params section also holds keys that are not the schedule's (weights,
        freeze points, cache settings); the typed params schema is where unknown keys are rejected.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(params, Mapping):
            values = {n: params[n] for n in names if n in params}
        else:
            values = {n: getattr(params, n) for n in names if hasattr(params, n)}
        return cls(**values)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of the 0-based ``epoch``."""
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        steps = epoch // self.lr_step if self.lr_step else 0
        return self.lr / self.lr_gamma**steps

    def is_rollback_epoch(self, epoch: int) -> bool:
        """Whether the roll-back check runs after the 0-based ``epoch`` (after every k-th completed epoch)."""
        return self.rollback_every > 0 and (epoch + 1) % self.rollback_every == 0

    def resolve_device(self) -> torch.device:
        """``device`` on this process, through the one chooser (honours a pinned ``$MAMMO_GPU``)."""
        return devices.choose_device(self.device)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the checkpoint (epochs may grow; workers/device move)."""
        values = dataclasses.asdict(self)
        for free in ("epochs", "num_workers", "device"):
            values.pop(free)
        return values


def make_optimizer(params: list[torch.nn.Parameter], schedule: Schedule) -> torch.optim.SGD:
    """SGD over the trainable parameters only (frozen ones would only carry dead momentum state)."""
    if not params:
        raise ValueError("no trainable parameters for the optimizer")
    return torch.optim.SGD(
        params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay
    )


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch lr as a LambdaLR (factor of ``schedule.lr``), so its state goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: schedule.lr_at(epoch) / schedule.lr)
