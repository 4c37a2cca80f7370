"""Which pretrained weights a stage will actually start from, for its key.

Why: several builders quietly fall back to random initialisation when a weights file is missing from the
local torch hub cache (the detector's ResNet-50, the single-network baselines). With only the *wanted*
source in the key, a run without the file and a run with it would share a key, and whichever ran first
would be served to the other. The key therefore carries what is on disk: the file's sha256 (a replaced
file is other weights too) or ``random``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from mammo_core.storage.store import file_sha256

RANDOM = "random"


@functools.cache
def _sha256_of(path: str, _inode: int, _size: int, _mtime_ns: int, _ctime_ns: int) -> str:
    """sha256 of a weights file, remembered for as long as its inode, size and times stay the same."""
    return file_sha256(Path(path))


def resolved_source(path: str | os.PathLike[str] | None) -> str:
    """``sha256:<hex>`` of the weights file a stage will load, or ``random`` when there is none."""
    if path is None:
        return RANDOM
    path = Path(path).expanduser()
    try:
        stat = path.stat()
    except FileNotFoundError:
        return RANDOM
    if not path.is_file():
        return RANDOM
    resolved = str(path.resolve())
    return "sha256:" + _sha256_of(resolved, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


KNOWN_SOURCES = {"imagenet": "ImageNet", "coco": "COCO"}


def describe(requested: str, path: str | os.PathLike[str] | None) -> dict[str, str]:
    """How a network was initialised, for the report's header: requested source, outcome, file and sha256.

    ``requested`` is the params value (``imagenet``, ``coco``, ``none`` or a path); ``path`` the file it
    resolves to. A requested file that is absent means random initialisation, and the line says so.
    """
    source = resolved_source(path) if requested != "none" else RANDOM
    wanted = KNOWN_SOURCES.get(requested, "random" if requested == "none" else "weights file")
    if source == RANDOM:
        outcome = "random" if requested == "none" else f"random ({wanted} requested, no file at {path})"
        return {"requested": requested, "initialisation": outcome, "file": "", "sha256": ""}
    return {"requested": requested, "initialisation": wanted, "file": str(Path(path).expanduser()),
            "sha256": source.removeprefix("sha256:")}
