"""What a served model accepts from a caller: a path policy and size caps, decided when the server starts.

Why: a model server answers whoever can reach it. Its ``path`` column would otherwise read any file the
server process can read, and a distinct error for "no such file" versus "not allowed" would let a caller
probe the host's file system. So:

- paths are read only under one allowed root given at serve time (none by default: arrays only);
- every refused path (no root configured, outside the root after resolving symlinks and ``..``, missing,
  not a regular file, larger than the cap) gets the same message, :data:`REFUSED_PATH`;
- arrays and decoded images are capped in pixels, files in bytes, requests in rows, so that one request
  cannot exhaust the server's memory.

``mammo predict`` is not a server: the person running it names the files, so it uses
:meth:`ServeLimits.for_named_files`, which allows exactly those files.

Settings come from the environment of the serving process (``mammo serve`` sets them; they can be set by
hand before ``mlflow models serve``): ``MAMMO_SERVE_ROOT``, ``MAMMO_SERVE_MAX_PIXELS``,
``MAMMO_SERVE_MAX_FILE_BYTES``, ``MAMMO_SERVE_MAX_ROWS``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mammo_core.errors import BadItem

ENV_ROOT = "MAMMO_SERVE_ROOT"
ENV_MAX_PIXELS = "MAMMO_SERVE_MAX_PIXELS"
ENV_MAX_FILE_BYTES = "MAMMO_SERVE_MAX_FILE_BYTES"
ENV_MAX_ROWS = "MAMMO_SERVE_MAX_ROWS"
REFUSED_PATH = "path refused: files are read only under the allowed root given when the server started"

# Defaults: well above a real full-field mammogram (about 5000 x 4000 pixels, 40 MB as 16-bit DICOM).
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_ROWS = 1024


@dataclass(frozen=True)
class ServeLimits:
    """Where served paths may be read from and how large one input may be."""

    root: Path | None = None  # None: no path is read (arrays only)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_rows: int = DEFAULT_MAX_ROWS
    named_files: frozenset[Path] | None = None  # set by ``for_named_files`` (the CLI), else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeLimits:
        """The limits of a serving process; a malformed number is an error naming the variable."""
        env = os.environ if env is None else env

        def number(name: str, default: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not an integer") from None
            if value < 1:
                raise ValueError(f"{name}={raw!r} must be at least 1")
            return value

        raw_root = env.get(ENV_ROOT, "").strip()
        root = Path(raw_root).resolve() if raw_root else None
        if root is not None and not root.is_dir():
            raise ValueError(f"{ENV_ROOT}={raw_root!r} is not a folder")
        return cls(root, number(ENV_MAX_PIXELS, DEFAULT_MAX_PIXELS),
                   number(ENV_MAX_FILE_BYTES, DEFAULT_MAX_FILE_BYTES), number(ENV_MAX_ROWS, DEFAULT_MAX_ROWS))

    def for_named_files(self, paths: Iterable[str | os.PathLike]) -> ServeLimits:
        """Limits that allow exactly ``paths`` (resolved): the files a local user named on the command line."""
        return replace(self, root=None, named_files=frozenset(Path(p).resolve() for p in paths))

    def env(self) -> dict[str, str]:
        """These limits as the environment variables :meth:`from_env` reads (for a serving subprocess)."""
        out = {ENV_MAX_PIXELS: str(self.max_pixels), ENV_MAX_FILE_BYTES: str(self.max_file_bytes),
               ENV_MAX_ROWS: str(self.max_rows)}
        if self.root is not None:
            out[ENV_ROOT] = str(self.root)
        return out

    def check_rows(self, n_rows: int) -> None:
        """ValueError for a request of more rows than the cap (the whole request is refused)."""
        if n_rows > self.max_rows:
            raise ValueError(f"request has {n_rows} rows; at most {self.max_rows} are served per request "
                             f"({ENV_MAX_ROWS})")

    def allowed_file(self, path: str | os.PathLike, item: str) -> Path:
        """The resolved file to read for a served ``path``; BadItem(:data:`REFUSED_PATH`) otherwise.

        Every refusal has the same reason, so a caller learns nothing about files it may not read.
        """
        refused = BadItem(item, REFUSED_PATH)
        if self.named_files is not None:  # the CLI: existence is the user's own business
            resolved = Path(path).resolve()
            if resolved not in self.named_files:
                raise refused
            if resolved.is_file() and resolved.stat().st_size > self.max_file_bytes:
                raise BadItem(item, f"file larger than {self.max_file_bytes} bytes")
            return resolved
        if self.root is None or not str(path).strip() or "\x00" in str(path):
            raise refused
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        try:
            inside = resolved.is_relative_to(self.root) and resolved.is_file()
            size = resolved.stat().st_size if inside else 0
        except OSError:
            raise refused from None
        if not inside or size > self.max_file_bytes:
            raise refused
        return resolved

    def check_pixels(self, shape: tuple[int, ...], item: str) -> None:
        """BadItem when an array or decoded image holds more pixels than the cap."""
        pixels = 1
        for n in shape:
            pixels *= int(n)
        if pixels > self.max_pixels:
            raise BadItem(item, f"image of {pixels} pixels exceeds the served limit of {self.max_pixels} "
                                f"({ENV_MAX_PIXELS})")

    def check_nested(self, value: Any, item: str) -> None:
        """Cap a nested-list (JSON) image before it is turned into an array: rows x longest row."""
        if isinstance(value, np.ndarray) and value.dtype != object:
            self.check_pixels(value.shape, item)
        elif isinstance(value, list | tuple | np.ndarray):  # rows may be lists or 1-D arrays (object column)
            width = max((len(r) for r in value if isinstance(r, list | tuple | np.ndarray)), default=1)
            self.check_pixels((len(value), width), item)


def without_path(reason: str, path: str, label: str) -> str:
    """``reason`` with the given path, and the file it resolves to, replaced by ``label``.

    Why: error texts of decoders quote the file they read, and CBIS file names carry patient ids; the
    caller sees its row label instead (one helper for the classifier and the detector).
    """
    if not path:
        return reason
    for form in sorted({path, str(Path(path).resolve())}, key=len, reverse=True):
        reason = reason.replace(form, label)
    return reason
