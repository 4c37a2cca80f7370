"""The stages in pipeline order (a topological order of the DAG in DESIGN.md §2)."""

from __future__ import annotations

from pathlib import Path

from mammo_core.config import Params
from tasks.runtime import StageSpec
from tasks.stages import (
    acquire,
    augment,
    baselines,
    classify,
    curate,
    detect,
    features,
    hashing,
    patches,
    report,
    train,
)

ORDER: tuple[StageSpec, ...] = (
    acquire.SPEC, curate.SPEC, patches.SPEC, augment.SPEC, train.SPEC, features.SPEC, hashing.SPEC, classify.SPEC,
    detect.SPEC, baselines.SPEC, report.SPEC,
)
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in ORDER}


def stage_keys(params: Params, code_root: Path | None = None) -> dict[str, str]:
    """The key of every stage for these params, in DAG order.

    I/O: the code to hash, library metadata, and for local data sources a ``stat`` of every file under
    ``data.root``. ``code_root`` hashes the code of another copy of the project (tests).
    """
    keys: dict[str, str] = {}
    for spec in ORDER:
        keys[spec.name] = spec.key(params, {u: keys[u] for u in spec.upstream}, code_root)
    return keys


def descendants(stage: str) -> set[str]:
    """``stage`` and every stage downstream of it."""
    out = {stage}
    for spec in ORDER:
        if any(u in out for u in spec.upstream):
            out.add(spec.name)
    return out


def ancestors(stage: str) -> set[str]:
    """Every stage ``stage`` needs, itself excluded."""
    out: set[str] = set()
    todo = list(STAGES[stage].upstream)
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo.extend(STAGES[name].upstream)
    return out
