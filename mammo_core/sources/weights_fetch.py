"""The one explicit download of pretrained weights: torchvision's files into the local torch hub cache.

Why a separate command: pipeline stages never touch the network (``weights: imagenet`` reads only the hub
cache and fails offline with a message), which is right for CI and air-gapped sites; a team with a network
runs ``mammo weights fetch`` once and the stages find the files where torchvision would have put them
(``torch.hub.get_dir()/checkpoints/<file name of torchvision's URL>``).

Integrity is torchvision's own rule: the file name carries a prefix of the file's SHA-256
(``densenet121-a639ec97.pth``; ``torch.hub.HASH_REGEX``), and a file whose digest does not start with it is
refused - deleted, never moved into the cache. Downloads are resumable: bytes already received stay in
``<file>.partial`` and the next attempt asks the server for the rest (HTTP Range); a server that ignores the
range gets a fresh download. The finished file is moved into place atomically.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import torch
import torchvision

from mammo_core.sources import weight_sources

BASE_URL_ENV = "MAMMO_WEIGHTS_BASE_URL"
CHUNK = 1 << 16


def torchvision_urls() -> dict[str, str]:
    """name -> torchvision's URL of the weights the pipeline can use (ImageNet backbones, COCO detector)."""
    m = torchvision.models
    return {
        "densenet121": m.DenseNet121_Weights.IMAGENET1K_V1.url,
        "resnet50": m.ResNet50_Weights.IMAGENET1K_V1.url,
        "vgg16": m.VGG16_Weights.IMAGENET1K_V1.url,
        "inception_v3": m.Inception_V3_Weights.IMAGENET1K_V1.url,
        "frcnn_r50": m.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url,
    }


class HashMismatch(RuntimeError):
    """A file's SHA-256 does not start with the prefix its name promises."""


@dataclass(frozen=True)
class Fetched:
    name: str
    path: Path
    sha256: str
    status: str  # "downloaded" | "resumed" | "present"


def hash_prefix_of(filename: str) -> str:
    """The SHA-256 prefix in a torchvision file name (``resnet50-0676ba61.pth`` -> ``0676ba61``)."""
    match = torch.hub.HASH_REGEX.search(filename)
    if match is None or not match.group(1):
        raise ValueError(f"{filename}: no hash prefix in the name (expected NAME-<hex>.EXT, as torchvision names "
                         f"its files); refusing a file that cannot be checked")
    return match.group(1)


def checkpoints_dir() -> Path:
    """The torch hub cache folder torchvision loads weight files from (honours ``TORCH_HOME``)."""
    return weight_sources.hub_checkpoints_dir()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def source_url(name_or_url: str, base_url: str | None = None) -> str:
    """torchvision's URL for a known name, with its host and folder replaced by ``base_url`` when given."""
    urls = torchvision_urls()
    if name_or_url not in urls:
        raise KeyError(f"unknown weights {name_or_url!r}; known: {', '.join(urls)}")
    url = urls[name_or_url]
    base = base_url or os.environ.get(BASE_URL_ENV) or ""
    return f"{base.rstrip('/')}/{url.rsplit('/', 1)[1]}" if base else url


def _verify(path: Path, expected_prefix: str, name: str | None = None) -> str:
    digest = file_sha256(path)
    if not digest.startswith(expected_prefix):
        raise HashMismatch(f"{name or path.name}: sha256 {digest} does not start with {expected_prefix!r} (the "
                           f"prefix in its name); refused")
    return digest


def download(url: str, destination: Path, progress: Callable[[int, int | None], None] | None = None,
             timeout: float = 60.0) -> str:
    """Download ``url`` to ``destination`` (resuming ``<destination>.partial``); verify; move into place.

    Returns "downloaded" or "resumed". :class:`HashMismatch` (and the partial file removed) when the
    received file does not match the hash prefix of ``destination``'s name; ``OSError``/``HTTPError`` on a
    network failure, with the partial file kept for the next attempt.
    """
    prefix = hash_prefix_of(destination.name)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    have = partial.stat().st_size if partial.is_file() else 0
    headers = {"User-Agent": "mammo-weights-fetch"} | ({"Range": f"bytes={have}-"} if have else {})
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)  # noqa: S310 (http(s) URLs of the user)
    except HTTPError as exc:
        if exc.code != 416 or not have:  # 416: the partial file is already complete
            raise
        response = None
    status = "downloaded"
    if response is not None:
        with response:
            resumed = have > 0 and response.status == 206
            if not resumed:
                have = 0
            status = "resumed" if resumed else "downloaded"
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(partial, "ab" if resumed else "wb") as out:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    have += len(block)
                    if progress is not None:
                        progress(have, total)
                out.flush()
                os.fsync(out.fileno())
            if total is not None and have < total:  # http.client returns short reads, it does not raise
                raise OSError(f"{url}: connection closed after {have} of {total} bytes; {partial} is kept, "
                              f"run again to resume")
    try:
        _verify(partial, prefix, destination.name)
    except HashMismatch:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, destination)
    return status


def fetch(name: str, base_url: str | None = None, cache: Path | None = None,
          progress: Callable[[int, int | None], None] | None = None) -> Fetched:
    """Put the weights ``name`` into the hub cache (or ``cache``); a verified file already there is kept.

    A file already in the cache whose hash does not match its name is refused, never overwritten: the user
    decides what to do with a file they did not get from this command.
    """
    url = source_url(name, base_url)
    destination = (cache or checkpoints_dir()) / torchvision_urls()[name].rsplit("/", 1)[1]
    prefix = hash_prefix_of(destination.name)
    if destination.is_file():
        return Fetched(name, destination, _verify(destination, prefix), "present")
    status = download(url, destination, progress)
    return Fetched(name, destination, file_sha256(destination), status)

