"""Training checkpoints: atomic writes, safe reads, RNG states that survive ``weights_only`` loading.

Why atomic: a kill during ``torch.save`` must never leave a truncated checkpoint at the final path, so
the file is written to a temporary sibling and renamed over it (``os.replace`` is atomic on one
filesystem). A rerun then always finds either the previous complete checkpoint or the new one. The file
is fsynced before the rename and its folder after, so a power loss cannot publish a checkpoint whose data
never reached the disk.

Why a previous checkpoint: with ``keep_previous`` the replaced checkpoint stays as ``checkpoint.prev.pt``
(a hard link made before the rename, so one of the two names always holds a complete file). When the
latest one cannot be read (a disk error, a file damaged after the fact), :func:`load_with_fallback`
resumes from the previous one with a warning, losing one epoch instead of the whole training.

Why ``weights_only=True``: a checkpoint is a pickle, and an unrestricted pickle runs arbitrary code when
loaded. With ``weights_only`` only tensors and plain containers/numbers/strings load, so everything we
store (including the Python and NumPy RNG states) is converted to those types first.
"""

from __future__ import annotations

import os
import random
import uuid
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mammo_core.runtime import faults
from mammo_core.storage import durable

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def previous_path(path: Path) -> Path:
    """Where :func:`save_atomic` keeps the checkpoint it replaced (``checkpoint.prev.pt``)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_atomic(payload: Mapping[str, Any], path: Path, keep_previous: bool = False) -> Path:
    """``torch.save`` to a temporary sibling, fsync it, then rename it into place.

    ``keep_previous`` first hard-links the current file to :func:`previous_path` (atomically replacing
    the one before), so a complete older checkpoint survives whatever happens to the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    link = path.with_name(f".{path.name}.{uuid.uuid4().hex}.prev.tmp")
    try:
        torch.save(dict(payload), tmp)
        durable.fsync_file(tmp)
        faults.at("checkpoint:write")
        if keep_previous and path.exists():
            os.link(path, link)
            os.replace(link, previous_path(path))
        os.replace(tmp, path)
        durable.fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
        link.unlink(missing_ok=True)
    return path


def exists(path: Path) -> bool:
    """True when a checkpoint to resume from exists: the latest or the previous one."""
    return path.exists() or previous_path(path).exists()


def load_with_fallback(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, Any], Path]:
    """(payload, the file it came from): the latest checkpoint, else the previous one with a warning.

    Only an unreadable file falls back: a readable checkpoint of another architecture or schedule is the
    caller's error to report, never silently replaced by an older file. Without a previous checkpoint the
    latest one's error is raised.
    """
    previous = previous_path(path)
    try:
        return load_safely(path, device), path
    except (ValueError, FileNotFoundError) as exc:
        if not previous.exists():
            raise
        warnings.warn(f"{path}: cannot be read ({exc}); resuming from the previous checkpoint {previous} "
                      f"(one epoch is trained again)", RuntimeWarning, stacklevel=2)
        return load_safely(previous, device), previous


def load_safely(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; anything else (a crafted pickle, junk) is a ValueError."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no checkpoint")
    _check_crcs(Path(path))
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # UnpicklingError for code-running payloads, RuntimeError for non-torch files
        raise ValueError(f"{path}: not a plain training checkpoint, refused ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a training checkpoint of format {FORMAT_VERSION}")
    return payload


def _check_crcs(path: Path) -> None:
    """ValueError when a member of the checkpoint's zip archive fails its CRC-32.

    Why: ``torch.load`` does not check the CRCs ``torch.save`` writes, so a checkpoint garbled on disk
    (same size, flipped bytes inside a tensor) would load as silently wrong weights.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return  # not a zip (a legacy or crafted file): torch.load below decides and refuses
    if bad is not None:
        raise ValueError(f"{path}: damaged, {bad} fails its CRC-32 check")


def check_same_architecture(path: Path, saved: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """ValueError naming ``path`` and the first key (in the model's order) whose presence or shape differs."""
    for key, tensor in expected.items():
        if key not in saved:
            raise ValueError(f"{path}: checkpoint of another architecture; first mismatched key {key!r} is missing")
        if tuple(saved[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{path}: checkpoint of another architecture; first mismatched key {key!r} has shape "
                f"{tuple(saved[key].shape)}, the model expects {tuple(tensor.shape)}"
            )
    for key in saved:
        if key not in expected:
            raise ValueError(f"{path}: checkpoint of another architecture; first mismatched key {key!r} is unexpected")


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG state training may touch, as tensors and plain values (``weights_only``-loadable)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "shuffle": generator.get_state(),
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: Mapping[str, Any], generator: torch.Generator) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["shuffle"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
