"""What a running ``mammo run`` tells its user: each stage's purpose in plain words, and about how long is left.

Why estimates at all: the default run takes many minutes on a laptop, most of them in two stages; a newcomer
who sees only "train" for ten minutes cannot tell a slow machine from a hung one. The estimate is honest
about where it comes from:

1. a stage that already ran in this store with the same params is expected to take what it took then (the
   ``seconds`` its manifest recorded);
2. any other stage gets its share of a reference profile (``REFERENCE_SECONDS``), scaled by how fast the
   stages finished so far in this run ran compared with the same profile; before any stage has finished
   there is nothing to scale by, and the time left is shown as unknown rather than guessed.

Reused (cached) stages count as no time. Everything here is plain computation on given times; the clock
is passed in so that the estimate can be tested without waiting.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mammo_core.storage.store import ArtifactStore

PURPOSE: dict[str, str] = {
    "acquire": "get the mammograms (generate the phantom twin, or download / find CBIS-DDSM)",
    "curate": "read and check every DICOM, crop the breast, resize, split patients into train/val/test",
    "patches": "cut lesion-centred and normal patches: what the classifiers learn from",
    "augment": "add rotated, sheared and flipped copies of the training patches",
    "train": "train the three DenseNets (Freeze1-3: different frozen blocks; train.mode says shared trunk or not)",
    "features": "export each network's features and find the best fusion of the three",
    "hashing": "train the hash decoder that turns fused features into short binary codes",
    "classify": "train SVM, kNN and random forest on the hash codes and fuse their votes",
    "detect": "train three lesion detectors (Faster R-CNN: ours, ours without hash, ResNet-50) and compare",
    "baselines": "train the single-network and classic baselines the paper compares with",
    "report": "write report.html: the paper's tables and figures from this run's numbers",
}

# Seconds per stage of the embedded default run (params/default.yaml) on a 2-core CPU, from the `done in`
# lines of `mammo run -p params/default.yaml` on a fresh store (775.7 s in all, 2026-12-03). Only the
# proportions matter: they are rescaled by the stages already finished, and a store's own history replaces them.
REFERENCE_SECONDS: dict[str, float] = {
    "acquire": 26.0, "curate": 11.0, "patches": 4.0, "augment": 1.0, "train": 101.0, "features": 11.0,
    "hashing": 37.0, "classify": 43.0, "detect": 302.0, "baselines": 224.0, "report": 7.0,
}


def about(seconds: float) -> str:
    """A rough duration for an estimate: 'about 40 s', 'about 12 min', 'about 1 h 5 min'."""
    if seconds < 60:
        return f"about {max(10, round(seconds / 10) * 10)} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"about {minutes} min"
    return f"about {minutes // 60} h {minutes % 60} min"


def exact(seconds: float) -> str:
    """A measured duration: '8 s', '3 min 12 s', '1 h 02 min'."""
    total = int(round(seconds))
    if total < 60:
        return f"{total} s"
    if total < 3600:
        return f"{total // 60} min {total % 60:02d} s"
    return f"{total // 3600} h {total % 3600 // 60:02d} min"


def previous_seconds(store: ArtifactStore, stage: str, stage_params: Mapping[str, Any]) -> float | None:
    """How long ``stage`` took the last time it ran in this store with the same params, or None.

    Any finished folder of the stage counts whose manifest records the same params sections (the key may
    differ: code changed, or an upstream stage's params did); the newest such folder wins.
    """
    wanted = json.loads(json.dumps(dict(stage_params), default=str))
    folder_root = store.stage_dir(stage)
    if not folder_root.is_dir():
        return None
    best: tuple[float, float] | None = None  # (created, seconds)
    for path in folder_root.iterdir():
        if path.name.startswith("."):
            continue
        try:
            folder = store.find(stage, path.name)
        except (OSError, ValueError):  # unreadable manifest: no history from it
            continue
        if folder is None or folder.manifest.get("params") != wanted or "seconds" not in folder.manifest:
            continue
        created = float(folder.manifest.get("created_unix", 0.0))
        if best is None or created > best[0]:
            best = (created, float(folder.manifest["seconds"]))
    return None if best is None else best[1]


@dataclass(frozen=True)
class PlannedStage:
    """One stage of this run as planned: reused from the store or to run, and its recorded duration if any."""

    name: str
    cached: bool
    previous_seconds: float | None = None


@dataclass
class RunClock:
    """Elapsed time of the run and of the current stage, and the estimate of what is left."""

    stages: list[PlannedStage]
    now: Callable[[], float]
    started_at: float = 0.0
    stage_started_at: dict[str, float] = field(default_factory=dict)
    took: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.started_at = self.now()

    def position(self, stage: str) -> str:
        """'3/11': where a stage is in this run."""
        names = [s.name for s in self.stages]
        return f"{names.index(stage) + 1}/{len(names)}"

    def start(self, stage: str) -> None:
        self.stage_started_at[stage] = self.now()

    def finish(self, stage: str, seconds: float | None = None) -> float:
        """Record the end of a stage: ``seconds`` as the stage measured them, else the wall time since start."""
        self.took[stage] = seconds if seconds is not None else self.now() - self.stage_started_at.get(stage, self.now())
        return self.took[stage]

    def elapsed(self) -> float:
        return self.now() - self.started_at

    def stage_elapsed(self, stage: str) -> float:
        return self.now() - self.stage_started_at[stage] if stage in self.stage_started_at else 0.0

    def expected(self, stage: PlannedStage) -> float | None:
        """Expected seconds of a stage: 0 when reused, its recorded time, else its scaled reference share."""
        if stage.cached:
            return 0.0
        if stage.previous_seconds is not None:
            return stage.previous_seconds
        rate = self._reference_rate()
        return None if rate is None else REFERENCE_SECONDS.get(stage.name, 0.0) * rate

    def remaining(self) -> float | None:
        """Seconds left in the run, or None while there is nothing to base the estimate on."""
        left = 0.0
        for stage in self.stages:
            if stage.name in self.took:
                continue
            expected = self.expected(stage)
            if expected is None:
                return None
            left += max(expected - self.stage_elapsed(stage.name), 0.0)
        return left

    def describe_remaining(self) -> str:
        left = self.remaining()
        if left is None:
            return "time left: estimated once the first stage has finished"
        if left < 5:
            return "almost done"
        return f"{about(left)} left"

    def _reference_rate(self) -> float | None:
        """How this run's finished stages compare with the reference profile (measured / reference)."""
        ran = [s for s in self.stages if s.name in self.took and not s.cached and REFERENCE_SECONDS.get(s.name)]
        reference = sum(REFERENCE_SECONDS[s.name] for s in ran)
        if not ran or reference <= 0:
            return None
        return sum(self.took[s.name] for s in ran) / reference
