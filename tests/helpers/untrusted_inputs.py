"""Untrusted-input cases for the reliability summary (issue 16): each plants one hostile input, hands it to
the code that must refuse it, and returns the refusal message (None when it was accepted).

The detailed behaviour of each case (exact message, nothing else lost, time and bytes bounded) is asserted
in tests/core/data/test_untrusted_images.py, tests/core/data/test_curation.py and tests/core/sources/test_tcia.py;
here every case only has to be refused with a message holding its ``expect`` fragment, and
tests/reliability/test_reliability.py counts them.
Add a case by adding one ``Case`` to ``CASES``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from mammo_core.data import dicom_io
from mammo_core.errors import BadItem
from mammo_core.runtime.isolation import ItemFailed, run_isolated
from mammo_core.sources import tcia
from tests.core.data.test_untrusted_images import compressed_file, jpeg_declaring, png_declaring
from tests.helpers.fake_tcia import Failure, FakeNbiaServer, FakeSeries

ROOT_UID = "1.3.6.1.4.1.9590.100.1.2.16"


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # a fragment the refusal message must hold
    attempt: Callable[[Path], str | None]


def _reading(make: Callable[[Path], Path]) -> Callable[[Path], str | None]:
    def attempt(tmp: Path) -> str | None:
        try:
            dicom_io.read_image_file(make(tmp))
        except BadItem as exc:
            return exc.reason
        return None

    return attempt


def _huge_dicom(syntax, **kw) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        return compressed_file(tmp / "huge.dcm", syntax, **kw)

    return make


def _huge_picture(kind: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / f"huge.{kind}"
        path.write_bytes(png_declaring(100_000, 100_000) if kind == "png" else jpeg_declaring(65_000, 65_000))
        return path

    return make


def crash_or_hang(item: str) -> str:
    """A worker function standing for a decoder: ``crash`` takes its process down, ``hang`` never returns."""
    if item == "crash":
        os._exit(3)
    if item == "hang":
        time.sleep(3600)
    return item


def _isolated(item: str) -> Callable[[Path], str | None]:
    def attempt(tmp: Path) -> str | None:
        results = run_isolated(crash_or_hang, ["good", item, "good"], workers=2, time_limit_s=0.5)
        assert results[0] == results[2] == "good", results  # the others went on
        return results[1].reason if isinstance(results[1], ItemFailed) else None

    return attempt


def _hostile_server(kind: str) -> Callable[[Path], str | None]:
    def attempt(tmp: Path) -> str | None:
        good = FakeSeries.make(f"{ROOT_UID}.1", f"{ROOT_UID}.10", "Mass-Training_P_00001_LEFT_CC")
        bad = FakeSeries.make(f"{ROOT_UID}.2", f"{ROOT_UID}.20", "Mass-Training_P_00002_LEFT_CC")
        with FakeNbiaServer([good, bad], {bad.series_uid: Failure(kind)}, trickle_s=0.05) as server:
            summary = tcia.download_collection(tmp, base_url=server.base_url, allow_http_loopback=True, retries=0,
                                               backoff=0, timeout=0.5, deadline=0.5)
        assert summary.downloaded == [good.series_uid], summary  # the others went on
        return summary.failed[0][1] if summary.failed else None

    return attempt


def _plain_http(tmp: Path) -> str | None:
    try:
        tcia.download_collection(tmp / "out", base_url="http://127.0.0.1:9/nbia-api/services/v1")
    except ValueError as exc:
        return str(exc)
    return None


def _busy_folder(tmp: Path) -> str | None:
    series = [FakeSeries.make(f"{ROOT_UID}.1", f"{ROOT_UID}.10", "Mass-Training_P_00001_LEFT_CC")]
    with FakeNbiaServer(series, delay_s=0.3) as server:
        kw = {"base_url": server.base_url, "allow_http_loopback": True, "backoff": 0}
        first = threading.Thread(target=tcia.download_collection, args=(tmp,), kwargs=kw)
        first.start()
        while not server.requests[("getSeries", "CBIS-DDSM")]:
            time.sleep(0.01)
        try:
            tcia.download_collection(tmp, **kw)
        except tcia.DownloadFolderBusy as exc:
            return str(exc)
        finally:
            first.join()
    return None


CASES: tuple[Case, ...] = (
    Case("dicom_rle_declaring_60000x60000", "image too large", _reading(_huge_dicom(RLELossless, rows=60000,
                                                                                    cols=60000))),
    Case("dicom_j2k_declaring_60000x60000", "image too large", _reading(_huge_dicom(JPEG2000Lossless, rows=60000,
                                                                                    cols=60000))),
    Case("dicom_jpegls_declaring_60000x60000", "image too large", _reading(_huge_dicom(JPEGLSLossless, rows=60000,
                                                                                       cols=60000))),
    Case("dicom_declaring_100_frames_of_4096x4096", "image too large",
         _reading(_huge_dicom(RLELossless, rows=4096, cols=4096, frames=100))),
    Case("png_declaring_100000x100000", "image too large", _reading(_huge_picture("png"))),
    Case("jpeg_declaring_65000x65000", "image too large", _reading(_huge_picture("jpeg"))),
    Case("image_crashing_its_worker", "given up after a retry alone", _isolated("crash")),
    Case("image_hanging_its_worker", "time limit", _isolated("hang")),
    Case("download_endless_body", "body larger than", _hostile_server("endless")),
    Case("download_announcing_10_GiB", "more than the", _hostile_server("huge_length")),
    Case("download_trickling", "deadline passed", _hostile_server("trickle")),
    Case("download_truncated_zip", "corrupt zip", _hostile_server("truncated_zip")),
    Case("download_wrong_md5", "md5 mismatch", _hostile_server("bad_md5")),
    Case("download_over_plain_http", "TCIA downloads need https", _plain_http),
    Case("download_into_a_busy_folder", "another download is writing into", _busy_folder),
)


def run_cases(base: Path) -> dict[str, str | None]:
    """name -> refusal message (None when accepted), each case in its own folder under ``base``."""
    out: dict[str, str | None] = {}
    for case in CASES:
        folder = base / case.name
        folder.mkdir(parents=True)
        out[case.name] = case.attempt(folder)
    return out


def unrefused(messages: dict[str, str | None]) -> dict[str, str | None]:
    """The cases not refused with their expected message (empty when all behaved)."""
    expect = {c.name: c.expect for c in CASES}
    return {name: msg for name, msg in messages.items() if msg is None or expect[name] not in msg}
