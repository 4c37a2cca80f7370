"""Download a TCIA collection (CBIS-DDSM by default) through the public NBIA REST API.

Endpoints used (NBIA "Search" API v1, no login for public collections):
``getSeries?Collection=...`` lists the series as JSON (SeriesInstanceUID, StudyInstanceUID, PatientID,
SeriesDescription, ImageCount, FileSize, ...); ``getImageWithMD5Hash?SeriesInstanceUID=...`` returns a
zip of the series plus ``md5hashes.csv`` (columns Filename, MD5Hash). Where a server lacks that endpoint
(HTTP 404) the plain ``getImage`` zip is used and verified against the series' FileSize and ImageCount.

The full collection is ~160 GB and 6775 series, so the download is built to be interrupted:
- resumable: a series counts as finished only when its marker ``<out>/.done/<SeriesUID>.json`` exists
  (written last, listing every file with size and md5) and its files still have those sizes. Bytes in
  flight live in ``<out>/.partial/`` (``*.zip.part`` and the extraction folder) and are never taken for
  a finished series;
- verified: transfer length against Content-Length, every file against the publisher's md5 list (or the
  series size); a mismatch is retried, then reported as failed with its reason;
- isolated: one series failing (network, checksum, unsafe zip entry) never stops the others;
- bounded: a body may not exceed the size the series list announced (plus a margin), every request has
  a whole-request deadline besides the per-read timeout (a server trickling a byte a minute is cut off),
  only https is spoken (plain http only to a loopback test server, when asked for explicitly), and the
  output folder is locked, so two downloads never share ``.partial`` files.

Files land in the classic layout ``<out>/CBIS-DDSM/<PatientID>/<StudyUID>/<SeriesUID>/<file>.dcm``
(in CBIS-DDSM the PatientID is the series folder name, e.g. ``Mass-Training_P_00001_LEFT_CC``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import urllib3
from filelock import FileLock
from filelock import Timeout as LockTimeout

from mammo_core.errors import BadItem
from mammo_core.sources.safe_zip import extract_zip_safely
from mammo_core.storage.durable import write_text_atomic

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://services.cancerimagingarchive.net/nbia-api/services/v1"
DATA_FOLDER = "CBIS-DDSM"
DONE_FOLDER = ".done"
PARTIAL_FOLDER = ".partial"
MD5_LIST_NAME = "md5hashes.csv"
# The only getSeries fields copied to series.json: none of them identifies a person (CBIS PatientIDs
# are the collection's own pseudonyms such as "Mass-Training_P_00001_LEFT_CC").
PUBLIC_SERIES_FIELDS = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "Collection",
    "Modality",
    "SeriesDescription",
    "ImageCount",
    "FileSize",
)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_CHUNK = 1 << 20
LOCK_NAME = ".download.lock"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# A series' zip holds its DICOM files (FileSize in the list), md5hashes.csv and zip headers: it may
# exceed FileSize by this much. Deflate only shrinks DICOM, so the margin is generous.
BODY_MARGIN_BYTES = 1 << 20
BODY_MARGIN_FRACTION = 0.10
UNKNOWN_SIZE_LIMIT = 4 << 30  # a series listed without FileSize (never seen in CBIS-DDSM: max ~0.1 GB)
SERIES_LIST_LIMIT = 64 << 20  # getSeries of all 6775 CBIS-DDSM series is ~3 MB of JSON
DEFAULT_DEADLINE_S = 900.0

Progress = Callable[[str, str, int, int], None]  # (series_uid, status, done, total)


@dataclass(frozen=True)
class SeriesInfo:
    """One series as listed by getSeries (only the fields the download needs)."""

    series_uid: str
    study_uid: str
    patient_id: str
    description: str = ""
    image_count: int | None = None
    file_size: int | None = None
    public: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_api(cls, row: dict[str, Any]) -> SeriesInfo:
        def as_int(value: Any) -> int | None:
            try:
                return int(value)
            except (TypeError, ValueError):
                return None

        return cls(
            series_uid=str(row.get("SeriesInstanceUID", "")).strip(),
            study_uid=str(row.get("StudyInstanceUID", "")).strip(),
            patient_id=str(row.get("PatientID", "")).strip(),
            description=str(row.get("SeriesDescription", "") or ""),
            image_count=as_int(row.get("ImageCount")),
            file_size=as_int(row.get("FileSize")),
            public={k: row[k] for k in PUBLIC_SERIES_FIELDS if k in row},
        )

    def check_safe(self) -> None:
        """The three names become folder names: refuse anything that could escape the data folder."""
        for uid in (self.series_uid, self.study_uid):
            if not _UID.match(uid):
                raise BadItem(self.series_uid or "?", f"malformed UID {uid!r} in the series list")
        if not _SAFE_NAME.match(self.patient_id) or ".." in self.patient_id:
            raise BadItem(self.series_uid, f"unsafe PatientID {self.patient_id!r} in the series list")


@dataclass
class DownloadSummary:
    """What one ``download_collection`` call did, by SeriesInstanceUID."""

    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (series_uid, reason)

    @property
    def ok(self) -> bool:
        return not self.failed

    def raise_if_incomplete(self, out: Path, shown: int = 5) -> None:
        """IncompleteDownload naming the failed series, if any.

        Why: a dataset with holes must never be sealed as the acquired data (the stage would be reused
        forever, holes included); failing instead makes the next run retry exactly the failed series.
        """
        if not self.failed:
            return
        listed = "; ".join(f"{uid} ({reason})" for uid, reason in self.failed[:shown])
        more = f"; and {len(self.failed) - shown} more" if len(self.failed) > shown else ""
        total = len(self.failed) + len(self.downloaded) + len(self.skipped)
        raise IncompleteDownload(
            f"{len(self.failed)} of {total} series failed to download into {out}: {listed}{more}. "
            f"Run again: finished series are kept and only the failed ones are retried."
        )


class IncompleteDownload(RuntimeError):
    """Some selected series could not be downloaded and verified."""


class _Retryable(Exception):
    """A transient failure (network, truncation, checksum): try the series again."""


class _Permanent(Exception):
    """Trying again cannot help (unsafe archive, HTTP 4xx): report the series as failed."""


class _NoMd5Endpoint(Exception):
    """The server has no getImageWithMD5Hash: fall back to getImage."""


class DownloadFolderBusy(RuntimeError):
    """Another download holds the lock of the output folder."""


def check_url(url: str, *, allow_http_loopback: bool = False) -> None:
    """Refuse anything but https, except plain http to this machine when the caller allows it (tests).

    Why: the downloaded files become training data; over plain http anyone on the path can replace
    them (the md5 list travels in the same response, so it cannot help).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and allow_http_loopback and parts.hostname in LOOPBACK_HOSTS:
        return
    hint = " (plain http only to a loopback test server, with allow_http_loopback)" if parts.scheme == "http" else ""
    raise ValueError(f"refusing {parts.scheme or 'scheme-less'} URL {parts.scheme}://{parts.netloc}: "
                     f"TCIA downloads need https{hint}")


def body_limit(info: SeriesInfo) -> int:
    """The most bytes the zip of ``info`` may have: the announced FileSize plus a margin."""
    if info.file_size is None:
        return UNKNOWN_SIZE_LIMIT
    return info.file_size + max(BODY_MARGIN_BYTES, int(info.file_size * BODY_MARGIN_FRACTION))


def _bounded_body(response: requests.Response, max_bytes: int, deadline: float):
    """The (decoded) body in pieces; _Permanent past ``max_bytes``, _Retryable past ``deadline``.

    ``read1`` returns after one socket read, so the deadline is checked at least once per read
    timeout even when the server sends one byte at a time (``iter_content`` would wait for a full
    chunk). Decoded bytes are counted, so a gzip-encoded body cannot expand past the bound either.
    """
    received = 0
    while True:
        if time.monotonic() > deadline:
            raise _Retryable(f"deadline passed: {received} bytes received in the time allowed per request")
        piece = response.raw.read1(_CHUNK, decode_content=True)
        if not piece:
            return
        received += len(piece)
        if received > max_bytes:
            raise _Permanent(f"body larger than the {max_bytes} bytes allowed (announced size plus margin)")
        yield piece


def series_dir(out: Path, info: SeriesInfo) -> Path:
    """Where a series lands: the classic layout under ``<out>/CBIS-DDSM``."""
    return Path(out) / DATA_FOLDER / info.patient_id / info.study_uid / info.series_uid


def marker_path(out: Path, series_uid: str) -> Path:
    return Path(out) / DONE_FOLDER / f"{series_uid}.json"


def _atomic_write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def is_finished(out: Path, series_uid: str) -> bool:
    """True when the series' marker exists and every file it lists is on disk with its recorded size.

    Sizes, not md5s, are re-checked: cheap enough for 6775 series on every resume, and a file replaced
    by a same-size different file is not something an interrupted download produces.
    """
    marker = marker_path(out, series_uid)
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        files = record["files"]
        if not files:
            return False
        for entry in files:
            if (Path(out) / entry["path"]).stat().st_size != int(entry["size"]):
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _get_with_retries(
    session: requests.Session, url: str, params: dict[str, str], retries: int, timeout: float, backoff: float,
    deadline_s: float = DEFAULT_DEADLINE_S, allow_http_loopback: bool = False,
) -> bytes:
    """The body of a small GET (the series list), at most SERIES_LIST_LIMIT bytes within ``deadline_s``."""
    last = ""
    for attempt in range(retries + 1):
        start = time.monotonic()
        try:
            with session.get(url, params=params, timeout=timeout, stream=True) as response:
                check_url(response.url, allow_http_loopback=allow_http_loopback)  # after redirects
                if response.status_code < 500 and response.status_code != 429:
                    response.raise_for_status()
                    return b"".join(_bounded_body(response, SERIES_LIST_LIMIT, start + deadline_s))
                last = f"HTTP {response.status_code}"
        except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        except _Retryable as exc:
            last = str(exc)
        except _Permanent as exc:
            raise ValueError(f"GET {url}: {exc}") from None
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    raise ConnectionError(f"GET {url} failed after {retries + 1} attempts: {last}")


def list_series(
    collection: str = "CBIS-DDSM",
    *,
    base_url: str = DEFAULT_BASE_URL,
    session: requests.Session | None = None,
    retries: int = 3,
    timeout: float = 60,
    backoff: float = 1.0,
    deadline: float = DEFAULT_DEADLINE_S,
    allow_http_loopback: bool = False,
) -> list[SeriesInfo]:
    """All series of ``collection``, in a stable order (PatientID, StudyUID, SeriesUID).

    Raises ConnectionError when the list cannot be fetched: without it there is nothing to download.
    """
    check_url(base_url, allow_http_loopback=allow_http_loopback)
    session = session or requests.Session()
    url = f"{base_url.rstrip('/')}/getSeries"
    body = _get_with_retries(session, url, {"Collection": collection}, retries, timeout, backoff,
                             deadline, allow_http_loopback)
    rows = json.loads(body) if body.strip() else []
    if not isinstance(rows, list):
        raise ValueError(f"getSeries returned {type(rows).__name__}, expected a JSON list")
    infos = {}
    for row in rows:
        if isinstance(row, dict):
            info = SeriesInfo.from_api(row)
            infos.setdefault(info.series_uid, info)  # a series listed twice is downloaded once
    return sorted(infos.values(), key=lambda s: (s.patient_id, s.study_uid, s.series_uid))


def _stream_to_file(
    session: requests.Session, url: str, params: dict[str, str], part: Path, timeout: float,
    *, max_bytes: int, deadline_s: float, allow_http_loopback: bool,
) -> None:
    """Stream one response body into ``part``; _Retryable when the transfer is incomplete or too slow,
    _Permanent when it is larger than ``max_bytes`` (announced or received)."""
    start = time.monotonic()
    try:
        with session.get(url, params=params, stream=True, timeout=timeout) as response:
            check_url(response.url, allow_http_loopback=allow_http_loopback)  # after redirects
            code = response.status_code
            if code == 404 and url.endswith("getImageWithMD5Hash"):
                raise _NoMd5Endpoint()
            if code >= 500 or code == 429:
                raise _Retryable(f"HTTP {code}")
            if code != 200:
                raise _Permanent(f"HTTP {code} from {url.rsplit('/', 1)[-1]}")
            expected = response.headers.get("Content-Length")
            if expected is not None and expected.isdigit() and int(expected) > max_bytes:
                raise _Permanent(f"server announces {expected} bytes, more than the {max_bytes} allowed "
                                 "(announced size plus margin)")
            encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
            received = 0
            with open(part, "wb") as fh:
                for chunk in _bounded_body(response, max_bytes, start + deadline_s):
                    fh.write(chunk)
                    received += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
    except ValueError as exc:  # check_url: redirected to plain http or elsewhere
        raise _Permanent(str(exc)) from None
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError) as exc:
        raise _Retryable(f"transfer interrupted ({type(exc).__name__})") from exc
    if expected is not None and not encoded and received != int(expected):
        raise _Retryable(f"truncated transfer: {received} of {expected} bytes")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_md5_list(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text)))
    listed: dict[str, str] = {}
    for row in rows:
        norm = {str(k).strip().lower(): str(v or "").strip() for k, v in row.items() if k is not None}
        name, md5 = norm.get("filename", ""), norm.get("md5hash", "")
        if not name or not md5:
            raise _Retryable(f"{MD5_LIST_NAME} has a row without Filename/MD5Hash")
        listed[name.replace("\\", "/")] = md5.lower()
    return listed


def _verify(staging: Path, info: SeriesInfo) -> tuple[list[dict[str, Any]], str]:
    """Check the extracted series; returns its files (relative name, size, md5) and how it was verified."""
    md5_list_path = staging / MD5_LIST_NAME
    listed = _read_md5_list(md5_list_path) if md5_list_path.is_file() else None
    images = sorted(
        p for p in staging.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm" and not p.is_symlink()
    )
    if not images:
        raise _Retryable("the zip holds no DICOM file")
    files = [
        {"name": p.relative_to(staging).as_posix(), "size": p.stat().st_size, "md5": _md5(p)} for p in images
    ]
    if listed is not None:
        names = {f["name"] for f in files}
        if set(listed) != names:
            raise _Retryable(
                f"{MD5_LIST_NAME} lists {len(listed)} files but the zip holds {len(names)} other files"
            )
        for f in files:
            if listed[f["name"]] != f["md5"]:
                raise _Retryable(f"md5 mismatch for {f['name']}")
        how = "md5"
    else:
        total = sum(f["size"] for f in files)
        if info.file_size is not None and total != info.file_size:
            raise _Retryable(f"size mismatch: {total} bytes extracted, series list says {info.file_size}")
        how = "size"
    if info.image_count is not None and len(files) != info.image_count:
        raise _Retryable(f"{len(files)} DICOM files, series list says {info.image_count}")
    return files, how


class _Downloader:
    """Shared settings plus one requests.Session per worker thread (Session is not thread-safe)."""

    def __init__(self, out: Path, base_url: str, retries: int, timeout: float, backoff: float,
                 deadline: float, allow_http_loopback: bool):
        self.out = out
        self.deadline = deadline
        self.allow_http_loopback = allow_http_loopback
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.use_md5_endpoint = True
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def download(self, info: SeriesInfo) -> None:
        """Download one series; raises _Permanent with the reason once retries are spent."""
        info.check_safe()
        last = ""
        for attempt in range(self.retries + 1):
            try:
                self._attempt(info)
                return
            except _Retryable as exc:
                last = str(exc)
                log.warning("series %s attempt %d: %s", info.series_uid, attempt + 1, last)
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise _Permanent(f"gave up after {self.retries + 1} attempts: {last}")

    def _attempt(self, info: SeriesInfo) -> None:
        partial = self.out / PARTIAL_FOLDER
        partial.mkdir(parents=True, exist_ok=True)
        part = partial / f"{info.series_uid}.zip.part"
        staging = partial / f"{info.series_uid}.extract"
        try:
            self._fetch(info, part)
            shutil.rmtree(staging, ignore_errors=True)
            try:
                extract_zip_safely(part, staging)
            except zipfile.BadZipFile as exc:
                raise _Retryable(f"corrupt zip ({exc})") from exc
            except BadItem as exc:
                raise _Permanent(f"unsafe zip entry {exc.item!r}: {exc.reason}") from exc
            files, how = _verify(staging, info)
            for extra in [p for p in staging.rglob("*") if p.is_file() and p.suffix.lower() != ".dcm"]:
                extra.unlink()  # md5hashes.csv, LICENSE: verified or not image data
            final = series_dir(self.out, info)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # left by a run killed between the move and the marker
                shutil.rmtree(final)
            os.replace(staging, final)
            rel = final.relative_to(self.out)
            record = {
                "series_uid": info.series_uid,
                "study_uid": info.study_uid,
                "patient_id": info.patient_id,
                "series_description": info.description,
                "verified_by": how,
                "files": [
                    {"path": (rel / f["name"]).as_posix(), "size": f["size"], "md5": f["md5"]} for f in files
                ],
            }
            _atomic_write_text(marker_path(self.out, info.series_uid), json.dumps(record, indent=1))
        finally:
            part.unlink(missing_ok=True)
            shutil.rmtree(staging, ignore_errors=True)

    def _fetch(self, info: SeriesInfo, part: Path) -> None:
        """The zip of one series into ``part``. File names are kept as served (the md5 list refers to
        them); only the plain getImage is asked for the retriever's ``1-1.dcm`` names."""
        params = {"SeriesInstanceUID": info.series_uid}
        limits = {"max_bytes": body_limit(info), "deadline_s": self.deadline,
                  "allow_http_loopback": self.allow_http_loopback}
        if self.use_md5_endpoint:
            try:
                url = f"{self.base_url}/getImageWithMD5Hash"
                _stream_to_file(self.session, url, params, part, self.timeout, **limits)
                return
            except _NoMd5Endpoint:
                log.info("no getImageWithMD5Hash on %s: verifying by size instead", self.base_url)
                self.use_md5_endpoint = False
        params["NewFileNames"] = "Yes"
        _stream_to_file(self.session, f"{self.base_url}/getImage", params, part, self.timeout, **limits)


def _outcome(future: Future) -> tuple[str, str]:
    """("downloaded", "") or ("failed", reason) for one finished series."""
    try:
        future.result()
    except BadItem as exc:
        return "failed", exc.reason
    except _Permanent as exc:
        return "failed", str(exc)
    except Exception as exc:  # one series' surprise must not stop the others
        return "failed", f"{type(exc).__name__}: {exc}"
    return "downloaded", ""


def download_collection(
    out: Path,
    *,
    collection: str = "CBIS-DDSM",
    base_url: str = DEFAULT_BASE_URL,
    limit: int | None = None,
    series_filter: Callable[[SeriesInfo], bool] | None = None,
    workers: int = 4,
    retries: int = 3,
    timeout: float = 60,
    progress: Progress | None = None,
    backoff: float = 1.0,
    deadline: float = DEFAULT_DEADLINE_S,
    allow_http_loopback: bool = False,
    lock_timeout: float = 0.0,
) -> DownloadSummary:
    """Download (or finish downloading) ``collection`` into ``out``; returns what happened per series.

    ``series_filter`` keeps the series it returns True for, then ``limit`` keeps the first N in the
    stable order of ``list_series``. ``retries`` is the number of extra attempts per series after the
    first (waiting ``backoff * 2**k`` seconds). ``progress(series_uid, status, done, total)`` is called
    in this thread once per series with status "downloaded", "skipped" or "failed". The selected series
    are written to ``out/series.json`` (non-identifying fields only).

    ``timeout`` bounds each socket read, ``deadline`` each whole request (seconds). ``base_url`` must be
    https; ``allow_http_loopback`` admits plain http to 127.0.0.1/localhost (the tests' fake server).
    ``out`` is locked for the whole call: a second download into it waits ``lock_timeout`` seconds,
    then raises :class:`DownloadFolderBusy` (ValueError for a refused URL, before anything is written).
    """
    check_url(base_url, allow_http_loopback=allow_http_loopback)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock_path = out / LOCK_NAME
    try:
        with FileLock(lock_path, timeout=lock_timeout):
            return _download_locked(
                out, collection, base_url, limit, series_filter, workers, retries, timeout, progress, backoff,
                deadline, allow_http_loopback,
            )
    except LockTimeout:
        raise DownloadFolderBusy(
            f"another download is writing into {out} (it holds {lock_path}); wait for it to finish "
            "or download into another folder"
        ) from None


def _download_locked(
    out: Path, collection: str, base_url: str, limit: int | None,
    series_filter: Callable[[SeriesInfo], bool] | None, workers: int, retries: int, timeout: float,
    progress: Progress | None, backoff: float, deadline: float, allow_http_loopback: bool,
) -> DownloadSummary:
    series = list_series(collection, base_url=base_url, retries=retries, timeout=timeout, backoff=backoff,
                         deadline=deadline, allow_http_loopback=allow_http_loopback)
    if series_filter is not None:
        series = [s for s in series if series_filter(s)]
    if limit is not None:
        series = series[: max(0, limit)]
    _atomic_write_text(out / "series.json", json.dumps([s.public for s in series], indent=1))

    summary = DownloadSummary()
    todo: list[SeriesInfo] = []
    total = len(series)
    done = 0
    for info in series:
        if _UID.match(info.series_uid) and is_finished(out, info.series_uid):
            summary.skipped.append(info.series_uid)
            done += 1
            if progress:
                progress(info.series_uid, "skipped", done, total)
        else:
            todo.append(info)

    downloader = _Downloader(out, base_url, retries, timeout, backoff, deadline, allow_http_loopback)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(downloader.download, info): info for info in todo}
        try:
            for future in as_completed(futures):
                uid = futures[future].series_uid
                status, reason = _outcome(future)
                if status == "downloaded":
                    summary.downloaded.append(uid)
                else:
                    summary.failed.append((uid, reason))
                    log.error("series %s failed: %s", uid, reason)
                done += 1
                if progress:
                    progress(uid, status, done, total)
        except BaseException:  # Ctrl-C: start no queued series; the running ones end on their own
            for future in futures:
                future.cancel()
            raise
    order = {s.series_uid: i for i, s in enumerate(series)}
    summary.downloaded.sort(key=order.__getitem__)
    summary.failed.sort(key=lambda item: order[item[0]])
    return summary

