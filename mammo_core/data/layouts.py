"""Find the image files of a CBIS-DDSM CSV path in each on-disk layout of the data.

The CSV paths (``<folder>/<StudyUID>/<SeriesUID>/000000.dcm``) never match a real download file for
file: downloads rename the files (``1-1.dcm``) and the descriptive layout renames the UID folders. So a
CSV path is joined on its *series*, and the series folder is listed:

- ``classic``: ``<root>/.../<folder>/<StudyUID>/<SeriesUID>/*.dcm`` (files ``1-1.dcm``, ``000000.dcm``...).
- ``descriptive``: ``<root>/.../CBIS-DDSM/<folder>/<MM-DD-YYYY-DDSM[-NA]-NNNNN>/<N.000000-<desc>-NNNNN>/
  *.dcm``: the study folder ends with the last five digits of the study UID and the series folder with
  those of the series UID (checked on real paths: Calc-Test_P_00038_LEFT_CC, study ...96009, series
  ...63992 -> ``08-29-2017-DDSM-NA-96009/1.000000-full mammogram images-63992``). Joined through the
  NBIA retriever's ``metadata.csv`` ("Series UID" -> "File Location") where present, else through
  (folder, study suffix, series suffix).
- ``jpeg``: the Kaggle JPEG repackaging, ``<root>/csv/dicom_info.csv`` + ``<root>/jpeg/<SeriesUID>/*.jpg``.

``SeriesIndex.build`` walks the tree once (os.scandir), so resolving 10k CSV rows costs one walk and
10k dictionary lookups. Every resolved file must lie inside the root: a symlink pointing elsewhere
makes its series a BadItem rather than a silent read from another place.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mammo_core.data.cbis_paths import CbisPath
from mammo_core.errors import BadItem

LAYOUTS = ("classic", "descriptive", "jpeg")
DICOM_SUFFIXES = frozenset({".dcm"})
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
METADATA_CSV = "metadata.csv"
FINGERPRINT_BYTES = 64 * 1024

_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
_DESCRIPTIVE_STUDY = re.compile(r"^\d{2}-\d{2}-\d{4}-.*-(?P<tail>[^-]+)$")
_DESCRIPTIVE_SERIES = re.compile(r"^\d+\.\d+-.*-(?P<tail>[^-]+)$")
_DETECT_MAX_DIRS = 20_000
_METADATA_MAX_DEPTH = 3


def _natural_key(path: Path) -> list:
    """Sort 1-2.dcm before 1-10.dcm."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _cbis_text(cbis_path: CbisPath) -> str:
    return f"{cbis_path.folder}/{cbis_path.study_uid}/{cbis_path.series_uid}/{cbis_path.filename}"


def _suffix_of(name: str, pattern: re.Pattern) -> str | None:
    match = pattern.match(name)
    return match.group("tail") if match else None


def detect_layout(root: str | os.PathLike) -> str:
    """Which layout ``root`` holds: "classic", "descriptive" or "jpeg"; ValueError when none.

    Looks for decisive evidence (jpeg: ``csv/dicom_info.csv`` or ``jpeg/``; descriptive: a
    ``metadata.csv`` or a ``MM-DD-YYYY-...-NNNNN/N.000000-...-NNNNN`` pair of folders; classic: a
    ``<StudyUID>/<SeriesUID>`` pair of folders), walking breadth-first and stopping at the first hit.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data root {root} is not a folder")
    if (root / "csv" / "dicom_info.csv").is_file() or (root / "jpeg").is_dir():
        return "jpeg"
    queue: list[tuple[Path, int]] = [(root, 0)]
    visited = 0
    while queue and visited < _DETECT_MAX_DIRS:
        folder, depth = queue.pop(0)
        visited += 1
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name == METADATA_CSV and depth < _METADATA_MAX_DEPTH and entry.is_file():
                return "descriptive"
            if not entry.is_dir():
                continue
            if _UID.match(entry.name) and _UID.match(folder.name):
                return "classic"
            if _DESCRIPTIVE_SERIES.match(entry.name) and _DESCRIPTIVE_STUDY.match(folder.name):
                return "descriptive"
            if not entry.name.startswith("."):
                queue.append((Path(entry.path), depth + 1))
    raise ValueError(
        f"no CBIS-DDSM layout found under {root}: expected classic (<folder>/<StudyUID>/<SeriesUID>/*.dcm), "
        "descriptive (CBIS-DDSM/<folder>/<MM-DD-YYYY-DDSM-NNNNN>/<N.000000-...-NNNNN>/*.dcm, optionally "
        "with metadata.csv) or jpeg (csv/dicom_info.csv + jpeg/<SeriesUID>/*.jpg)"
    )


@dataclass
class _ImageDir:
    path: Path
    files: list[Path]
    escapes: str | None = None  # why the folder or one of its files lies outside the root


def _walk_image_dirs(root: Path, suffixes: frozenset[str]) -> Iterator[tuple[_ImageDir, list[Path]]]:
    """Yield every folder holding image files once, plus the metadata.csv files seen on the way.

    Symlinked folders are followed (data often lives on another disk behind a link) but a folder whose
    real path leaves the root is flagged, never silently read; real paths guard against link cycles.
    """
    root_real = Path(os.path.realpath(root))
    stack: list[tuple[Path, int, bool]] = [(root, 0, False)]
    seen_real: set[str] = set()
    while stack:
        folder, depth, outside = stack.pop()
        real = os.path.realpath(folder)
        if real in seen_real:
            continue
        seen_real.add(real)
        outside = outside or not Path(real).is_relative_to(root_real)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        files: list[Path] = []
        metadata: list[Path] = []
        escapes = f"{folder} resolves outside the data root" if outside else None
        for entry in entries:
            if entry.name.startswith("."):
                continue  # .done, .partial, editor and OS droppings
            try:
                if entry.is_dir():
                    stack.append((Path(entry.path), depth + 1, outside))
                    continue
                if not entry.is_file():
                    continue
            except OSError:
                continue
            path = Path(entry.path)
            if entry.name == METADATA_CSV and depth < _METADATA_MAX_DEPTH:
                metadata.append(path)
            elif path.suffix.lower() in suffixes:
                if entry.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(root_real):
                    escapes = escapes or f"{path.name} is a link that resolves outside the data root"
                files.append(path)
        if files:
            yield _ImageDir(folder, sorted(files, key=_natural_key), escapes), metadata
        elif metadata:
            yield _ImageDir(folder, [], escapes), metadata


def _read_metadata_csv(path: Path) -> dict[str, Path]:
    """Series UID -> series folder, from one NBIA retriever metadata.csv (paths relative to its folder)."""
    out: dict[str, Path] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            uid = (row.get("Series UID") or "").strip()
            location = (row.get("File Location") or "").strip().replace("\\", "/")
            if not uid or not location:
                continue
            parts = [p for p in location.split("/") if p not in ("", ".")]
            if ".." in parts or location.startswith("/"):
                continue  # a location escaping the download folder is not trusted
            out[uid] = path.parent.joinpath(*parts)
    return out


@dataclass
class SeriesIndex:
    """All series folders under one data root, indexed once; ``files_for`` resolves CSV paths."""

    root: Path
    layout: str
    dirs: dict[Path, _ImageDir] = field(default_factory=dict, repr=False)
    by_uid: dict[str, list[Path]] = field(default_factory=dict, repr=False)
    by_suffix: dict[tuple[str, str, str], list[Path]] = field(default_factory=dict, repr=False)
    study_of: dict[Path, str] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, root: str | os.PathLike, layout: str | None = None) -> SeriesIndex:
        """Walk ``root`` once; ``layout`` None means ``detect_layout(root)``."""
        root = Path(root)
        layout = layout or detect_layout(root)
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        index = cls(root=root, layout=layout)
        by_uid: dict[str, list[Path]] = defaultdict(list)
        by_suffix: dict[tuple[str, str, str], list[Path]] = defaultdict(list)
        metadata: dict[str, Path] = {}
        suffixes = JPEG_SUFFIXES if layout == "jpeg" else DICOM_SUFFIXES
        scan_root = root / "jpeg" if layout == "jpeg" and (root / "jpeg").is_dir() else root
        for image_dir, metadata_files in _walk_image_dirs(scan_root, suffixes):
            for meta in metadata_files:
                metadata.update(_read_metadata_csv(meta))
            if not image_dir.files:
                continue
            folder = image_dir.path
            index.dirs[folder] = image_dir
            if layout in ("classic", "jpeg"):
                if _UID.match(folder.name):
                    by_uid[folder.name].append(folder)
                    if layout == "classic" and _UID.match(folder.parent.name):
                        index.study_of[folder] = folder.parent.name
            else:
                study_tail = _suffix_of(folder.parent.name, _DESCRIPTIVE_STUDY)
                series_tail = _suffix_of(folder.name, _DESCRIPTIVE_SERIES)
                if study_tail and series_tail:
                    by_suffix[(folder.parent.parent.name, study_tail, series_tail)].append(folder)
        for uid, folder in metadata.items():
            if folder in index.dirs:
                by_uid[uid].append(folder)
        index.by_uid = dict(by_uid)
        index.by_suffix = dict(by_suffix)
        return index

    def __len__(self) -> int:
        return len(self.dirs)

    def _candidates(self, cbis_path: CbisPath) -> list[Path]:
        found = self.by_uid.get(cbis_path.series_uid, [])
        if found or self.layout != "descriptive":
            return found
        return self.by_suffix.get((cbis_path.folder, cbis_path.study_suffix, cbis_path.series_suffix), [])

    def files_for(self, cbis_path: CbisPath) -> list[Path]:
        """All image files of the series named by ``cbis_path``, naturally sorted (1-2 before 1-10).

        BadItem(<csv path>, reason) when the series is missing, ambiguous (two folders claim it), sits
        in a study other than the CSV's, or resolves outside the root.
        """
        item = _cbis_text(cbis_path)
        folders = list(dict.fromkeys(self._candidates(cbis_path)))
        if not folders:
            raise BadItem(item, f"series {cbis_path.series_uid} not found under {self.root}")
        if len(folders) > 1:
            shown = ", ".join(str(f.relative_to(self.root)) for f in folders[:3])
            raise BadItem(item, f"series {cbis_path.series_uid} found in {len(folders)} folders: {shown}")
        folder = folders[0]
        study = self.study_of.get(folder)
        if study is not None and study != cbis_path.study_uid:
            raise BadItem(item, f"series {cbis_path.series_uid} is filed under study {study}, not the CSV's")
        image_dir = self.dirs[folder]
        if image_dir.escapes:
            raise BadItem(item, image_dir.escapes)
        return list(image_dir.files)


def file_fingerprint(path: Path, size: int | None = None) -> str:
    """sha256 over the size, the first 64 KiB and the last 64 KiB of a file.

    Why not the full hash: the raw data is ~160 GB, and hashing it all on every acquire would take longer
    than the rest of the stage. What goes wrong with downloaded data is truncation (size, tail),
    replacement by another image (DICOM header at the head) or re-encoding (both ends): all seen here
    for 128 KiB per file. It is a change detector for caching, not a proof of integrity; the download
    itself is checked with the publisher's md5.
    """
    size = path.stat().st_size if size is None else size
    digest = hashlib.sha256(str(size).encode() + b"\0")
    with open(path, "rb") as fh:
        digest.update(fh.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            fh.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(fh.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


def build_inventory(root: str | os.PathLike) -> pd.DataFrame:
    """Every regular file under ``root`` (hidden entries and ``*.part`` skipped) with size and fingerprint.

    Columns: path (POSIX, relative to root), size, fingerprint (see ``file_fingerprint``); sorted by
    path, so two inventories of the same data compare equal row for row.
    """
    root = Path(root)
    rows = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or name.endswith(".part"):
                continue
            path = Path(folder) / name
            if not path.is_file():
                continue
            size = path.stat().st_size
            rel = path.relative_to(root).as_posix()
            rows.append({"path": rel, "size": size, "fingerprint": file_fingerprint(path, size)})
    frame = pd.DataFrame(rows, columns=["path", "size", "fingerprint"])
    return frame.sort_values("path", ignore_index=True)
