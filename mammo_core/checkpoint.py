"""Training checkpoints: atomic writes, safe reads, RNG states that survive ``weights_only`` loading.

Why atomic: a kill during ``torch.save`` must never leave a truncated checkpoint at the final path, so
the file is written to a temporary sibling and renamed over it (``os.replace`` is atomic on one
filesystem). A rerun then always finds either the previous complete checkpoint or the new one.

Why ``weights_only=True``: a checkpoint is a pickle, and an unrestricted pickle runs arbitrary code when
loaded. With ``weights_only`` only tensors and plain containers/numbers/strings load, so everything we
store (including the Python and NumPy RNG states) is converted to those types first.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mammo_core import faults

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def save_atomic(payload: Mapping[str, Any], path: Path) -> Path:
    """``torch.save`` to a temporary sibling, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(dict(payload), tmp)
        faults.at("checkpoint:write")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_safely(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; anything else (a crafted pickle, junk) is a ValueError."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # UnpicklingError for code-running payloads, RuntimeError for non-torch files
        raise ValueError(f"{path}: not a plain training checkpoint, refused ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a training checkpoint of format {FORMAT_VERSION}")
    return payload


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
