"""Which pretrained weights a stage will actually start from, for its key.

Why: several builders quietly fall back to random initialisation when a weights file is missing from the
local torch hub cache (the detector's ResNet-50, the single-network baselines). With only the *wanted*
source in the key, a run without the file and a run with it would share a key, and whichever ran first
would be served to the other. The key therefore carries what is on disk: the file's sha256 (a replaced
file is other weights too) or ``random``.

The files are found here without importing torch or torchvision: every run computes every stage's key,
and asking ``torch.hub.get_dir()`` and torchvision's weights enums would cost a cached rerun, which trains
nothing, 3-4 s of imports on two cores. The folder follows torch.hub's rule and the names are the last
part of torchvision's URLs; ``tests/core/sources/test_weight_sources.py`` checks both against the
libraries, so an upgrade that moves either fails there instead of silently changing a key.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from mammo_core.storage.store import file_sha256

RANDOM = "random"

# The file torchvision downloads for each network the pipeline can start from (its URL's last part).
HUB_FILE_NAMES = {
    "densenet121": "densenet121-a639ec97.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "vgg16": "vgg16-397923af.pth",
    "inception_v3": "inception_v3_google-0cc3c7bd.pth",
    "frcnn_r50": "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
}


def hub_checkpoints_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints``: ``$TORCH_HOME/hub``, ``$TORCH_HOME`` defaulting to
    ``$XDG_CACHE_HOME/torch`` and that to ``~/.cache`` (torch.hub's rule; ``torch.hub.set_dir`` is not used
    by this project)."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    torch_home = os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))
    return Path(torch_home) / "hub" / "checkpoints"


def hub_file(name: str) -> Path:
    """Where torchvision keeps ``name``'s pretrained file (a key of :data:`HUB_FILE_NAMES`); it may be absent."""
    if name not in HUB_FILE_NAMES:
        raise ValueError(f"no pretrained file is known for {name!r}; known: {', '.join(HUB_FILE_NAMES)}")
    return hub_checkpoints_dir() / HUB_FILE_NAMES[name]


def backbone_file(weights: str) -> Path | None:
    """The file the DenseNet-121 branches load for ``train.weights`` (``imagenet``, ``none`` or a path)."""
    if weights == "none":
        return None
    return hub_file("densenet121") if weights == "imagenet" else Path(weights)


def r50_detector_file(weights: str) -> Path | None:
    """The file the ResNet-50 FPN detector loads for ``detect.r50_weights``: ``coco`` (the detection
    checkpoint), ``imagenet`` (the ResNet-50 classifier), ``none`` or a path."""
    if weights == "none":
        return None
    if weights in ("coco", "imagenet"):
        return hub_file("frcnn_r50" if weights == "coco" else "resnet50")
    return Path(weights)


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
