"""A fake NBIA REST server on 127.0.0.1 for the TCIA downloader tests.

It serves ``getSeries``, ``getImageWithMD5Hash`` and ``getImage`` with real zip payloads built from tiny
real DICOM files, and can inject one failure per series:

- ``drop``: the connection closes after half of the body (Content-Length announces all of it)
- ``truncate``: Content-Length is larger than the body sent
- ``bad_md5``: md5hashes.csv carries a wrong hash
- ``zip_slip``: the zip holds an entry ``../evil.dcm``
- ``error_500``: HTTP 500 instead of the zip
- ``endless``: 200 with no Content-Length and a body that never ends (zeros until the client hangs up)
- ``huge_length``: Content-Length announces 10 GiB (then the real zip)
- ``trickle``: the right Content-Length, then one byte every ``trickle_s`` seconds
- ``truncated_zip``: a complete HTTP response whose body is the first half of the zip

``delay_s`` delays every image response (to make two downloads overlap); ``series_list_failure``
(``endless`` or ``trickle``) breaks getSeries the same way.

``Failure(kind, times)`` injects the failure on the first ``times`` requests of that series (None:
always), so a test can show both "retried, then fine" and "retries spent, reported as failed".
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


def tiny_dicom(*, patient_id: str, study_uid: str, series_uid: str, instance: int) -> bytes:
    """A valid 4x4 16-bit MG DICOM file (Part 10, explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = f"{series_uid}.{instance}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MG"
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = 4, 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (np.arange(16, dtype=np.uint16) * (instance + 1)).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass
class FakeSeries:
    series_uid: str
    study_uid: str
    patient_id: str
    description: str = "full mammogram images"
    files: dict[str, bytes] = field(default_factory=dict)  # name in the zip -> bytes

    @classmethod
    def make(cls, series_uid: str, study_uid: str, patient_id: str, n_images: int = 1, **kw) -> FakeSeries:
        files = {
            f"1-{i}.dcm": tiny_dicom(
                patient_id=patient_id, study_uid=study_uid, series_uid=series_uid, instance=i
            )
            for i in range(1, n_images + 1)
        }
        return cls(series_uid, study_uid, patient_id, files=files, **kw)

    def api_row(self) -> dict:
        return {
            "SeriesInstanceUID": self.series_uid,
            "StudyInstanceUID": self.study_uid,
            "PatientID": self.patient_id,
            "Collection": "CBIS-DDSM",
            "Modality": "MG",
            "SeriesDescription": self.description,
            "SeriesDate": "2016-07-21",  # a date: must never reach series.json
            "Manufacturer": "FAKE",
            "ImageCount": len(self.files),
            "FileSize": sum(len(b) for b in self.files.values()),
        }


@dataclass
class Failure:
    kind: str  # drop | truncate | bad_md5 | zip_slip | error_500 | endless | huge_length | trickle | truncated_zip
    times: int | None = None  # None: every request


class FakeNbiaServer:
    """Context manager: ``with FakeNbiaServer(series, failures) as server: server.base_url``."""

    ENDLESS_CAP = 1 << 30  # the endless body stops here anyway, so a broken client cannot hang the suite

    def __init__(self, series: list[FakeSeries], failures: dict[str, Failure] | None = None,
                 md5_endpoint: bool = True, delay_s: float = 0.0, trickle_s: float = 0.1,
                 series_list_failure: str | None = None):
        self.series = {s.series_uid: s for s in series}
        self.series_list_failure = series_list_failure
        self.delay_s = delay_s
        self.trickle_s = trickle_s
        self.endless_bytes_sent = 0
        self.failures = dict(failures or {})
        self.md5_endpoint = md5_endpoint
        self.requests: Counter[tuple[str, str]] = Counter()  # (endpoint, series uid) -> count
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/nbia-api/services/v1"

    def image_requests(self, series_uid: str) -> int:
        return self.requests[("getImageWithMD5Hash", series_uid)] + self.requests[("getImage", series_uid)]

    def __enter__(self) -> FakeNbiaServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _count(self, endpoint: str, uid: str) -> int:
        with self._lock:
            self.requests[(endpoint, uid)] += 1
            return self.requests[(endpoint, uid)]

    def _failure_for(self, uid: str, nth_request: int) -> str | None:
        failure = self.failures.get(uid)
        if failure is None or (failure.times is not None and nth_request > failure.times):
            return None
        return failure.kind

    def zip_payload(self, series: FakeSeries, *, with_md5: bool, failure: str | None) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in series.files.items():
                archive.writestr(name, data)
            if failure == "zip_slip":
                archive.writestr("../evil.dcm", b"DICM evil")
            if with_md5:
                lines = ["Filename,MD5Hash"]
                for name, data in series.files.items():
                    digest = hashlib.md5(data).hexdigest()
                    if failure == "bad_md5":
                        digest = "0" * 32
                    lines.append(f"{name},{digest}")
                archive.writestr("md5hashes.csv", "\r\n".join(lines) + "\r\n")
        return buffer.getvalue()

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str, length: int | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def _endless(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.end_headers()  # no Content-Length: the body ends when the connection does
                block = bytes(1 << 16)
                try:
                    while server.endless_bytes_sent < server.ENDLESS_CAP:
                        self.wfile.write(block)
                        server.endless_bytes_sent += len(block)
                except OSError:  # the client hung up: what the test wants
                    pass

            def _trickle(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(server.trickle_s)
                except OSError:
                    pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urlparse(self.path)
                endpoint = url.path.rsplit("/", 1)[-1]
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if endpoint == "getSeries":
                    server._count(endpoint, query.get("Collection", ""))
                    rows = [s.api_row() for s in server.series.values()]
                    self.close_connection = True
                    if server.series_list_failure == "endless":
                        self._endless()
                    elif server.series_list_failure == "trickle":
                        self._trickle(json.dumps(rows).encode())
                    else:
                        self._send(200, json.dumps(rows).encode(), "application/json")
                    return
                if endpoint not in ("getImage", "getImageWithMD5Hash"):
                    self._send(404, b"unknown endpoint", "text/plain")
                    return
                uid = query.get("SeriesInstanceUID", "")
                nth = server._count(endpoint, uid)
                if endpoint == "getImageWithMD5Hash" and not server.md5_endpoint:
                    self._send(404, b"no such endpoint", "text/plain")
                    return
                series = server.series.get(uid)
                if series is None:
                    self._send(404, b"no such series", "text/plain")
                    return
                failure = server._failure_for(uid, nth)
                if failure == "error_500":
                    self._send(500, b"internal error", "text/plain")
                    return
                body = server.zip_payload(
                    series, with_md5=endpoint == "getImageWithMD5Hash", failure=failure
                )
                self.close_connection = True
                time.sleep(server.delay_s)
                if failure == "endless":
                    self._endless()
                elif failure == "trickle":
                    self._trickle(body)
                elif failure == "huge_length":
                    self._send(200, body, "application/zip", length=10 << 30)
                elif failure == "truncated_zip":
                    self._send(200, body[: len(body) // 2], "application/zip")
                elif failure == "drop":
                    self._send(200, body[: len(body) // 2], "application/zip", length=len(body))
                elif failure == "truncate":
                    self._send(200, body, "application/zip", length=len(body) + 100)
                else:
                    self._send(200, body, "application/zip")

        return Handler
