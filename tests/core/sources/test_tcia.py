"""The NBIA downloader against a fake NBIA server, and safe zip extraction."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading
import time
import zipfile
from pathlib import Path

import pydicom
import pytest

from mammo_core.data.cbis_paths import CbisPath
from mammo_core.data.layouts import SeriesIndex, detect_layout
from mammo_core.errors import BadItem
from mammo_core.sources.safe_zip import extract_zip_safely
from mammo_core.sources.tcia import (
    DEFAULT_BASE_URL,
    DownloadFolderBusy,
    DownloadSummary,
    check_url,
    download_collection,
    is_finished,
    marker_path,
)
from tests.helpers.fake_tcia import Failure, FakeNbiaServer, FakeSeries

ROOT_UID = "1.3.6.1.4.1.9590.100.1.2"


def _series() -> list[FakeSeries]:
    """Four series in three patients; listed to the server out of order on purpose."""
    return [
        FakeSeries.make(f"{ROOT_UID}.300", f"{ROOT_UID}.30", "Mass-Training_P_00003_LEFT_MLO", n_images=1),
        FakeSeries.make(f"{ROOT_UID}.100", f"{ROOT_UID}.10", "Calc-Test_P_00001_LEFT_CC", n_images=1),
        FakeSeries.make(
            f"{ROOT_UID}.101", f"{ROOT_UID}.11", "Calc-Test_P_00001_LEFT_CC_1", n_images=2,
            description="ROI mask images",
        ),
        FakeSeries.make(f"{ROOT_UID}.200", f"{ROOT_UID}.20", "Mass-Test_P_00002_RIGHT_CC", n_images=1),
    ]


# stable order = (PatientID, StudyUID, SeriesUID)
SORTED_UIDS = [f"{ROOT_UID}.100", f"{ROOT_UID}.101", f"{ROOT_UID}.200", f"{ROOT_UID}.300"]


def _download(server: FakeNbiaServer, out: Path, **kw) -> DownloadSummary:
    kw.setdefault("retries", 2)
    kw.setdefault("timeout", 10)
    return download_collection(out, base_url=server.base_url, backoff=0, allow_http_loopback=True, **kw)


def _assert_series_on_disk(out: Path, series: FakeSeries) -> None:
    folder = out / "CBIS-DDSM" / series.patient_id / series.study_uid / series.series_uid
    assert sorted(p.name for p in folder.iterdir()) == sorted(series.files)
    for name, data in series.files.items():
        assert (folder / name).read_bytes() == data
    ds = pydicom.dcmread(folder / "1-1.dcm")
    assert ds.SeriesInstanceUID == series.series_uid
    assert ds.pixel_array.shape == (4, 4)
    assert is_finished(out, series.series_uid)


def test_full_download_builds_the_classic_layout_and_a_public_series_list(tmp_path: Path) -> None:
    series = _series()
    seen: list[tuple[str, str, int, int]] = []
    with FakeNbiaServer(series) as server:
        summary = _download(server, tmp_path, progress=lambda *a: seen.append(a))
    assert summary.downloaded == SORTED_UIDS
    assert summary.skipped == [] and summary.failed == [] and summary.ok
    for s in series:
        _assert_series_on_disk(tmp_path, s)
    record = json.loads(marker_path(tmp_path, f"{ROOT_UID}.101").read_text())
    assert record["verified_by"] == "md5"
    assert [f["md5"] for f in record["files"]] == [
        hashlib.md5(series[2].files[n]).hexdigest() for n in ("1-1.dcm", "1-2.dcm")
    ]
    listed = json.loads((tmp_path / "series.json").read_text())
    assert [row["SeriesInstanceUID"] for row in listed] == SORTED_UIDS
    assert listed[0]["PatientID"] == "Calc-Test_P_00001_LEFT_CC" and listed[1]["ImageCount"] == 2
    assert all("SeriesDate" not in row and "Manufacturer" not in row for row in listed)
    assert sorted(uid for uid, *_ in seen) == SORTED_UIDS
    assert [done for _, _, done, _ in seen] == [1, 2, 3, 4] and {t for *_, t in seen} == {4}
    assert not any((tmp_path / ".partial").iterdir())  # no leftovers after success


def test_second_run_downloads_nothing(tmp_path: Path) -> None:
    series = _series()
    with FakeNbiaServer(series) as server:
        _download(server, tmp_path)
        first = {s.series_uid: server.image_requests(s.series_uid) for s in series}
        again = _download(server, tmp_path)
        assert {s.series_uid: server.image_requests(s.series_uid) for s in series} == first
    assert again.downloaded == [] and again.failed == []
    assert again.skipped == SORTED_UIDS


def test_leftovers_of_a_killed_run_are_not_taken_for_finished_series(tmp_path: Path) -> None:
    series = _series()
    victim, moved = series[1], series[3]  # killed mid-transfer / killed before the marker was written
    partial = tmp_path / ".partial"
    partial.mkdir(parents=True)
    (partial / f"{victim.series_uid}.zip.part").write_bytes(b"PK\x03\x04 half a zip")
    stale = tmp_path / "CBIS-DDSM" / moved.patient_id / moved.study_uid / moved.series_uid
    stale.mkdir(parents=True)
    (stale / "1-1.dcm").write_bytes(b"stale bytes")
    (stale / "junk.dcm").write_bytes(b"from an older run")
    with FakeNbiaServer(series) as server:
        summary = _download(server, tmp_path)
    assert summary.downloaded == SORTED_UIDS
    for s in series:
        _assert_series_on_disk(tmp_path, s)  # the stale folder was replaced, junk.dcm is gone


def test_a_finished_series_whose_file_shrank_is_downloaded_again(tmp_path: Path) -> None:
    series = _series()[:1]
    with FakeNbiaServer(series) as server:
        _download(server, tmp_path)
        target = tmp_path / "CBIS-DDSM" / series[0].patient_id / series[0].study_uid / series[0].series_uid
        (target / "1-1.dcm").write_bytes(b"truncated")
        assert not is_finished(tmp_path, series[0].series_uid)
        again = _download(server, tmp_path)
    assert again.downloaded == [series[0].series_uid]
    _assert_series_on_disk(tmp_path, series[0])


@pytest.mark.parametrize("kind", ["drop", "truncate", "error_500", "bad_md5"])
def test_a_transient_failure_is_retried(tmp_path: Path, kind: str) -> None:
    series = _series()
    flaky = series[0].series_uid
    with FakeNbiaServer(series, {flaky: Failure(kind, times=1)}) as server:
        summary = _download(server, tmp_path)
        assert server.image_requests(flaky) == 2
    assert summary.downloaded == SORTED_UIDS and summary.failed == []
    for s in series:
        _assert_series_on_disk(tmp_path, s)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("drop", "transfer interrupted"),
        ("truncate", "transfer interrupted"),
        ("error_500", "HTTP 500"),
        ("bad_md5", "md5 mismatch for 1-1.dcm"),
    ],
)
def test_a_persistent_failure_fails_that_series_only(tmp_path: Path, kind: str, reason: str) -> None:
    series = _series()
    broken = series[3].series_uid  # ROOT_UID.200
    with FakeNbiaServer(series, {broken: Failure(kind)}) as server:
        summary = _download(server, tmp_path, retries=2, workers=2)
        assert server.image_requests(broken) == 3  # first attempt + 2 retries
    assert [uid for uid, _ in summary.failed] == [broken]
    assert "gave up after 3 attempts" in summary.failed[0][1] and reason in summary.failed[0][1]
    assert summary.downloaded == [u for u in SORTED_UIDS if u != broken]
    assert not marker_path(tmp_path, broken).exists()
    assert not (tmp_path / "CBIS-DDSM" / series[3].patient_id).exists()
    assert not any((tmp_path / ".partial").iterdir())


def test_zip_slip_is_rejected_without_retry_and_writes_nothing_outside(tmp_path: Path) -> None:
    series = _series()
    evil = series[1].series_uid  # ROOT_UID.100
    out = tmp_path / "out"
    with FakeNbiaServer(series, {evil: Failure("zip_slip")}) as server:
        summary = _download(server, out)
        assert server.image_requests(evil) == 1
    assert summary.failed == [(evil, "unsafe zip entry '../evil.dcm': '..' in entry name of zip "
                                     f"{evil}.zip.part")]
    assert len(summary.downloaded) == 3
    assert sorted(p.name for p in tmp_path.rglob("evil.dcm")) == []


def test_limit_takes_the_first_series_in_stable_order(tmp_path: Path) -> None:
    series = _series()
    with FakeNbiaServer(series) as server:
        summary = _download(server, tmp_path, limit=2)
        requested = sorted(s.series_uid for s in series if server.image_requests(s.series_uid))
    assert summary.downloaded == SORTED_UIDS[:2] == requested
    listed = json.loads((tmp_path / "series.json").read_text())
    assert [r["SeriesInstanceUID"] for r in listed] == SORTED_UIDS[:2]


def test_series_filter_selects_before_limit(tmp_path: Path) -> None:
    with FakeNbiaServer(_series()) as server:
        summary = _download(
            server, tmp_path, series_filter=lambda s: s.patient_id.startswith("Mass"), limit=1
        )
    assert summary.downloaded == [f"{ROOT_UID}.200"]


def test_without_md5_endpoint_the_series_size_verifies(tmp_path: Path) -> None:
    series = _series()
    with FakeNbiaServer(series, md5_endpoint=False) as server:
        summary = _download(server, tmp_path)
    assert summary.downloaded == SORTED_UIDS
    assert json.loads(marker_path(tmp_path, SORTED_UIDS[0]).read_text())["verified_by"] == "size"


def test_without_md5_endpoint_a_wrong_size_fails(tmp_path: Path) -> None:
    series = _series()
    lying = series[1]
    row = lying.api_row()

    class LyingSeries(FakeSeries):
        def api_row(self) -> dict:
            return {**row, "FileSize": row["FileSize"] + 1}

    series[1] = LyingSeries(lying.series_uid, lying.study_uid, lying.patient_id, files=lying.files)
    with FakeNbiaServer(series, md5_endpoint=False) as server:
        summary = _download(server, tmp_path, retries=0)
    expected = f"size mismatch: {row['FileSize']} bytes extracted, series list says {row['FileSize'] + 1}"
    assert summary.failed == [(lying.series_uid, f"gave up after 1 attempts: {expected}")]


def test_unsafe_patient_id_from_the_api_is_refused(tmp_path: Path) -> None:
    bad = FakeSeries.make(f"{ROOT_UID}.900", f"{ROOT_UID}.90", "../../etc")
    with FakeNbiaServer([bad]) as server:
        summary = _download(server, tmp_path / "out")
        assert server.image_requests(bad.series_uid) == 0
    assert summary.failed == [(bad.series_uid, "unsafe PatientID '../../etc' in the series list")]


# --- safe_zip ---------------------------------------------------------------------------------------


def _zip(path: Path, entries: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


def test_extract_zip_safely_extracts_nested_entries(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"1-1.dcm": b"one", "sub/1-2.dcm": b"two", "dir/": b""})
    files = extract_zip_safely(archive, tmp_path / "dest")
    assert files == [tmp_path / "dest" / "1-1.dcm", tmp_path / "dest" / "sub" / "1-2.dcm"]
    assert [f.read_bytes() for f in files] == [b"one", b"two"]


@pytest.mark.parametrize(
    ("entries", "symlink", "bad_entry", "reason"),
    [
        ({"ok.dcm": b"x", "../evil.dcm": b"x"}, None, "../evil.dcm", "'..' in entry name"),
        ({"ok.dcm": b"x", "a/../../evil.dcm": b"x"}, None, "a/../../evil.dcm", "'..' in entry name"),
        ({"/abs/evil.dcm": b"x"}, None, "/abs/evil.dcm", "absolute path"),
        ({"ok.dcm": b"x"}, "link.dcm", "link.dcm", "symlink entry"),
        ({"A.dcm": b"x", "a.dcm": b"y"}, None, "a.dcm", "duplicate entry"),
    ],
)
def test_extract_zip_safely_rejects_unsafe_entries(
    tmp_path: Path, entries: dict, symlink: str | None, bad_entry: str, reason: str
) -> None:
    archive = _zip(tmp_path / "bad.zip", entries, symlink)
    with pytest.raises(BadItem) as caught:
        extract_zip_safely(archive, tmp_path / "dest")
    assert caught.value.item == bad_entry and reason in caught.value.reason
    assert sorted(os.listdir(tmp_path)) == ["bad.zip"]  # nothing extracted, no temp folder left


def test_extract_zip_safely_stops_a_zip_bomb(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", b"\0" * 1_000_000)
    assert archive.stat().st_size < 5_000
    with pytest.raises(BadItem, match="expands beyond 100000 bytes"):
        extract_zip_safely(archive, tmp_path / "dest", max_total_bytes=100_000)
    assert sorted(os.listdir(tmp_path)) == ["bomb.zip"]


def test_extract_zip_safely_counts_real_bytes_not_declared_sizes(tmp_path: Path) -> None:
    """A forged header that under-declares the size must not slip past the limit."""
    archive = tmp_path / "forged.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("big.dcm", b"x" * 5000)
    data = bytearray(archive.read_bytes())
    # patch the uncompressed size (central directory) down to 10 bytes
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24: cd + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises((BadItem, zipfile.BadZipFile)):
        extract_zip_safely(archive, tmp_path / "dest", max_total_bytes=1000)
    assert not (tmp_path / "dest").exists()


def test_extract_zip_safely_refuses_an_existing_target(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"1-1.dcm": b"one"})
    (tmp_path / "dest").mkdir()
    with pytest.raises(FileExistsError):
        extract_zip_safely(archive, tmp_path / "dest")


def test_extract_zip_safely_rejects_a_file_and_folder_of_the_same_name(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "clash.zip", {"a": b"file", "a/b.dcm": b"under a"})
    with pytest.raises(BadItem, match="clashes with an entry") as caught:
        extract_zip_safely(archive, tmp_path / "dest")
    assert caught.value.item == "a/b.dcm"
    assert sorted(os.listdir(tmp_path)) == ["clash.zip"]


def test_downloaded_tree_resolves_through_the_classic_layout(tmp_path: Path) -> None:
    series = _series()
    with FakeNbiaServer(series) as server:
        _download(server, tmp_path)
    assert detect_layout(tmp_path) == "classic"
    index = SeriesIndex.build(tmp_path)
    roi = series[2]
    files = index.files_for(CbisPath(roi.patient_id, roi.study_uid, roi.series_uid, "000000.dcm"))
    assert [f.read_bytes() for f in files] == [roi.files["1-1.dcm"], roi.files["1-2.dcm"]]


# --- hostile or broken servers (issue 16 §3): each costs only its series, within bounded bytes and time ---


def _hostile_case(tmp_path: Path, kind: str, **kw):
    series = _series()
    broken = series[3]  # ROOT_UID.200, one image
    start = time.monotonic()
    with FakeNbiaServer(series, {broken.series_uid: Failure(kind)}, trickle_s=0.05) as server:
        summary = _download(server, tmp_path, retries=1, workers=2, **kw)
        requests = server.image_requests(broken.series_uid)
        sent = server.endless_bytes_sent
    elapsed = time.monotonic() - start
    assert [uid for uid, _ in summary.failed] == [broken.series_uid]
    assert summary.downloaded == [u for u in SORTED_UIDS if u != broken.series_uid]
    for s in series[:3]:
        _assert_series_on_disk(tmp_path, s)
    assert not marker_path(tmp_path, broken.series_uid).exists()
    assert not (tmp_path / "CBIS-DDSM" / broken.patient_id).exists()
    assert not any((tmp_path / ".partial").iterdir())
    size = sum(len(b) for b in broken.files.values())
    return summary.failed[0][1], requests, elapsed, size, sent


def test_an_endless_body_is_cut_at_the_announced_size_plus_margin(tmp_path: Path) -> None:
    reason, requests, _, size, sent = _hostile_case(tmp_path, "endless")
    allowed = size + 2**20
    assert reason == f"body larger than the {allowed} bytes allowed (announced size plus margin)"
    assert requests == 1  # a server sending more than it announced is not asked again
    assert sent < 32 * 2**20  # the client hung up after ~1 MiB (socket buffers hold the rest)


def test_a_body_announced_larger_than_the_series_is_refused_before_reading(tmp_path: Path) -> None:
    reason, requests, _, size, _ = _hostile_case(tmp_path, "huge_length")
    assert reason == (f"server announces {10 << 30} bytes, more than the {size + 2**20} allowed "
                      "(announced size plus margin)")
    assert requests == 1


def test_a_trickling_server_is_cut_off_at_the_whole_request_deadline(tmp_path: Path) -> None:
    # one byte every 0.05 s never trips the 0.5 s read timeout; only the 1 s deadline can stop it
    reason, requests, elapsed, _, _ = _hostile_case(tmp_path, "trickle", timeout=0.5, deadline=1.0)
    assert re.fullmatch(r"gave up after 2 attempts: deadline passed: \d+ bytes received in the time "
                        r"allowed per request", reason), reason
    assert requests == 2
    assert elapsed < 8  # two deadlines and a little; without the deadline this takes minutes


def test_a_truncated_zip_is_retried_then_reported(tmp_path: Path) -> None:
    reason, requests, _, _, _ = _hostile_case(tmp_path, "truncated_zip")
    assert reason == "gave up after 2 attempts: corrupt zip (File is not a zip file)"
    assert requests == 2


def test_a_wrong_md5_is_retried_then_reported(tmp_path: Path) -> None:
    reason, requests, _, _, _ = _hostile_case(tmp_path, "bad_md5")
    assert reason == "gave up after 2 attempts: md5 mismatch for 1-1.dcm"
    assert requests == 2


def test_an_endless_series_list_is_cut_at_its_bound(tmp_path: Path) -> None:
    with FakeNbiaServer(_series(), series_list_failure="endless") as server:
        with pytest.raises(ValueError, match=r"getSeries: body larger than the 67108864 bytes allowed"):
            _download(server, tmp_path)
        assert sum(server.image_requests(s.series_uid) for s in _series()) == 0


def test_a_trickling_series_list_is_cut_at_the_deadline(tmp_path: Path) -> None:
    start = time.monotonic()
    late = r"getSeries failed after 1 attempts: deadline passed: \d+ bytes"
    with FakeNbiaServer(_series(), series_list_failure="trickle", trickle_s=0.05) as server, \
            pytest.raises(ConnectionError, match=late):
        _download(server, tmp_path, retries=0, timeout=0.5, deadline=0.5)
    assert time.monotonic() - start < 5


def test_plain_http_is_refused_unless_loopback_is_allowed_explicitly(tmp_path: Path) -> None:
    with FakeNbiaServer(_series()) as server:
        with pytest.raises(ValueError, match=r"refusing http URL http://127\.0\.0\.1:\d+: TCIA downloads need "
                                             r"https \(plain http only to a loopback test server"):
            download_collection(tmp_path / "out", base_url=server.base_url)
        assert server.requests == {}
    assert not (tmp_path / "out").exists()
    for url in ("http://example.org/nbia", "ftp://127.0.0.1/x"):  # loopback permission covers loopback only
        with pytest.raises(ValueError, match="TCIA downloads need https"):
            check_url(url, allow_http_loopback=True)
    check_url(DEFAULT_BASE_URL)


def test_two_downloads_into_one_folder_never_share_it(tmp_path: Path) -> None:
    series = _series()
    with FakeNbiaServer(series, delay_s=0.3) as server:
        first: dict[str, DownloadSummary] = {}
        runner = threading.Thread(target=lambda: first.update(summary=_download(server, tmp_path, workers=1)))
        runner.start()
        while not server.requests[("getSeries", "CBIS-DDSM")]:  # the first one holds the lock from here on
            time.sleep(0.01)
        with pytest.raises(DownloadFolderBusy) as err:
            _download(server, tmp_path)  # lock_timeout 0: fails at once, clearly
        assert str(err.value) == (f"another download is writing into {tmp_path} (it holds "
                                  f"{tmp_path / '.download.lock'}); wait for it to finish or download into "
                                  "another folder")
        waited = _download(server, tmp_path, lock_timeout=60)  # this one waits for the first to finish
        runner.join()
        assert server.requests[("getSeries", "CBIS-DDSM")] == 2  # the refused one asked nothing
        assert all(server.image_requests(s.series_uid) == 1 for s in series)
    assert first["summary"].downloaded == SORTED_UIDS and first["summary"].failed == []
    assert waited.skipped == SORTED_UIDS and waited.downloaded == [] and waited.failed == []
    for s in series:
        _assert_series_on_disk(tmp_path, s)
