"""Persist fitted classifiers with skops, sealed by a sha256 that loading checks.

Why skops and never pickle: unpickling runs whatever code the file names, so a model file swapped on disk
(or fetched from a registry) would execute on load. skops stores plain state and reconstructs only
types it is told to trust. We trust skops's defaults (numpy, scikit-learn estimators) plus an explicit
allow-list: our own estimator classes and the few scikit-learn internals our models contain that skops
does not trust by default. Anything else in a file is refused, with the offending type named.

Why the sha256: the stage manifest records it at save time; loading verifies the very bytes it then
deserialises (read once, hashed, then parsed from memory), so a tampered or swapped file is refused
before any parsing, and there is no window between check and use.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mammo_core.storage.durable import write_bytes_atomic

# Our own classes, plus scikit-learn internals reached through our members (calibrated SVM, random
# forest trees, the Bunch that Voting/Stacking keep their named estimators in). Named, never "all".
TRUSTED_MODEL_TYPES: tuple[str, ...] = (
    "mammo_core.codes.classifiers.FusedClassifier",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.tree._tree.Tree",
    "sklearn.utils._bunch.Bunch",
)


class ModelFileError(ValueError):
    """A model file cannot be loaded safely; the message names the file and the reason."""


def _skops_io():
    """skops.io, imported on first use: its import scans numpy and scikit-learn for trusted type names
    (about a second), which a command that saves or loads no model (a cached rerun) should not pay."""
    import skops.io

    return skops.io


def _allow_list(trusted: Sequence[str] | None) -> list[str]:
    if trusted is None:
        return list(TRUSTED_MODEL_TYPES)
    if isinstance(trusted, str | bytes) or not isinstance(trusted, Sequence) or not all(
        isinstance(t, str) and t and t.strip() == t for t in trusted
    ):
        raise TypeError(f"trusted must be a list of fully qualified type names, got {trusted!r}")
    return list(trusted)


def _untrusted(data: bytes, source: str) -> list[str]:
    try:
        return list(_skops_io().get_untrusted_types(data=data))
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
        raise ModelFileError(f"{source}: not a readable skops file ({type(exc).__name__}: {exc})") from exc


def _refuse_unexpected(data: bytes, source: str, allowed: Sequence[str]) -> list[str]:
    untrusted = _untrusted(data, source)
    unexpected = sorted(set(untrusted) - set(allowed))
    if unexpected:
        raise ModelFileError(f"{source}: refusing to load, it contains type(s) outside the allow-list: "
                             f"{unexpected}")
    return untrusted


def save_model(estimator: Any, path: str | Path, trusted: Sequence[str] | None = None) -> str:
    """Write ``estimator`` to ``path`` with skops, atomically; return the file's sha256 (hex).

    Refuses to save an object that :func:`load_model` would refuse (a type outside the allow-list), so a
    run never seals a model it cannot serve.
    """
    path = Path(path)
    data = _skops_io().dumps(estimator)
    _refuse_unexpected(data, f"model to save as {path}", _allow_list(trusted))
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def load_model(path: str | Path, expected_sha256: str, trusted: Sequence[str] | None = None) -> Any:
    """Load a skops model after checking its sha256 and that every untrusted type is allow-listed.

    ``trusted`` replaces :data:`TRUSTED_MODEL_TYPES` (pass ``[*TRUSTED_MODEL_TYPES, "pkg.Cls"]`` to extend
    it); it is always an explicit list of type names. Raises :class:`ModelFileError` (a ValueError)
    naming the file when the hash differs, the file is not a skops file, or it holds an unexpected type.
    """
    path = Path(path)
    allowed = _allow_list(trusted)
    if not isinstance(expected_sha256, str) or len(expected_sha256) != 64:
        raise ModelFileError(f"{path}: expected_sha256 must be a 64-character hex digest, got {expected_sha256!r}")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256.lower():
        raise ModelFileError(f"{path}: sha256 {actual} does not match the manifest's {expected_sha256}; "
                             "the file was modified or replaced, refusing to load")
    untrusted = _refuse_unexpected(data, str(path), allowed)
    return _skops_io().loads(data, trusted=untrusted)
