"""Resolving real CBIS-DDSM CSV paths in small trees of each on-disk layout."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from mammo_core.data.cbis_paths import CbisPath, parse_cbis_path
from mammo_core.data.layouts import SeriesIndex, build_inventory, detect_layout, file_fingerprint
from mammo_core.errors import BadItem
from tests.helpers.fixture_files import CBIS_CSV_DIR

FIXTURES = CBIS_CSV_DIR
PATH_COLUMNS = {
    "image file path": "full mammogram images",
    "cropped image file path": "cropped images",
    "ROI mask file path": "ROI mask images",
}


@dataclass(frozen=True)
class Series:
    """One series of the real CSVs: its CSV paths and the number of distinct files they name."""

    path: CbisPath  # the first CSV path naming it
    description: str
    n_files: int


def _real_series() -> list[Series]:
    """Series of a few real rows: the first three of two CSVs, P_00646 (study suffix with a leading
    zero), and the first row whose crop and mask sit in separate series."""
    picked: list[dict[str, str]] = []
    for name in ("mass_case_description_train_set.csv", "calc_case_description_test_set.csv"):
        with open(FIXTURES / name, newline="") as fh:
            rows = list(csv.DictReader(fh))
        picked += rows[:3]
        picked += [r for r in rows if r["image file path"].startswith("Calc-Test_P_00646_LEFT_CC/")][:1]
        split = [
            r for r in rows
            if parse_cbis_path(r["cropped image file path"]).series_uid
            != parse_cbis_path(r["ROI mask file path"]).series_uid
        ]
        picked += split[:1]
    files: dict[str, set[str]] = {}
    first: dict[str, tuple[CbisPath, str]] = {}
    for row in picked:
        for column, description in PATH_COLUMNS.items():
            parsed = parse_cbis_path(row[column])
            files.setdefault(parsed.series_uid, set()).add(parsed.filename)
            first.setdefault(parsed.series_uid, (parsed, description))
    return [Series(p, d, len(files[uid])) for uid, (p, d) in first.items()]


SERIES = _real_series()


def _write_files(folder: Path, n: int, names: str = "1-{}.dcm") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(1, n + 1):
        path = folder / names.format(k)
        path.write_bytes(f"{folder.name}/{k}".encode())
        out.append(path)
    return out


def _classic_tree(root: Path) -> dict[str, list[Path]]:
    expected = {}
    for i, s in enumerate(SERIES):
        folder = root / "CBIS-DDSM" / s.path.folder / s.path.study_uid / s.path.series_uid
        # real downloads name files 1-1.dcm; older ones kept 000000.dcm
        expected[s.path.series_uid] = _write_files(folder, s.n_files, "1-{}.dcm" if i % 2 else "00000{}.dcm")
    return expected


def _descriptive_tree(root: Path, with_metadata: bool) -> dict[str, list[Path]]:
    manifest = root / "manifest-1600000000000"
    expected = {}
    rows = []
    for s in SERIES:
        study = f"08-29-2017-DDSM-NA-{s.path.study_suffix}"
        series = f"1.000000-{s.description}-{s.path.series_suffix}"
        folder = manifest / "CBIS-DDSM" / s.path.folder / study / series
        expected[s.path.series_uid] = _write_files(folder, s.n_files)
        rows.append({
            "Series UID": s.path.series_uid, "Collection": "CBIS-DDSM", "Subject ID": s.path.folder,
            "Study UID": s.path.study_uid, "Series Description": s.description,
            "Number of Images": str(s.n_files),
            "File Location": f".\\CBIS-DDSM\\{s.path.folder}\\{study}\\{series}" if len(rows) % 2
            else f"./CBIS-DDSM/{s.path.folder}/{study}/{series}",
        })
    if with_metadata:
        with open(manifest / "metadata.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return expected


def _jpeg_tree(root: Path) -> dict[str, list[Path]]:
    expected = {}
    rows = []
    for s in SERIES:
        folder = root / "jpeg" / s.path.series_uid
        files = _write_files(folder, s.n_files, "1-24{}.jpg")
        expected[s.path.series_uid] = files
        for f in files:
            rows.append({
                "file_path": f"CBIS-DDSM/dicom/{s.path.series_uid}/{f.stem}.dcm",
                "image_path": f"CBIS-DDSM/jpeg/{s.path.series_uid}/{f.name}",
                "PatientID": s.path.folder, "SeriesDescription": s.description,
                "SeriesInstanceUID": s.path.series_uid, "StudyInstanceUID": s.path.study_uid,
                "Rows": "4", "Columns": "4",
            })
    (root / "csv").mkdir()
    with open(root / "csv" / "dicom_info.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return expected


def test_the_picked_rows_cover_the_interesting_cases() -> None:
    assert len(SERIES) >= 15
    assert {s.n_files for s in SERIES} == {1, 2}  # full images, and ROI series holding crop + mask
    assert "04488" in {s.path.study_suffix for s in SERIES}  # Calc-Test_P_00646_LEFT_CC
    assert {s.description for s in SERIES} == set(PATH_COLUMNS.values())


@pytest.mark.parametrize(
    ("builder", "layout"),
    [
        (_classic_tree, "classic"),
        (lambda root: _descriptive_tree(root, with_metadata=True), "descriptive"),
        (lambda root: _descriptive_tree(root, with_metadata=False), "descriptive"),
        (_jpeg_tree, "jpeg"),
    ],
    ids=["classic", "descriptive+metadata", "descriptive-folders", "jpeg"],
)
def test_every_series_resolves_to_its_files(tmp_path: Path, builder, layout: str) -> None:
    expected = builder(tmp_path)
    assert detect_layout(tmp_path) == layout
    index = SeriesIndex.build(tmp_path)
    assert index.layout == layout and len(index) == len(SERIES)
    for s in SERIES:
        assert index.files_for(s.path) == expected[s.path.series_uid]


def test_real_descriptive_folder_names_follow_the_uid_suffix_convention() -> None:
    """The one real descriptive path we know: Calc-Test_P_00038_LEFT_CC -> .../08-29-2017-DDSM-NA-96009/
    1.000000-full mammogram images-63992/1-1.dcm."""
    row = next(s for s in SERIES if s.path.folder == "Calc-Test_P_00038_LEFT_CC")
    assert (row.path.study_suffix, row.path.series_suffix) == ("96009", "63992")


def test_metadata_csv_wins_over_folder_names(tmp_path: Path) -> None:
    """A folder whose suffix does not match is still found through metadata.csv (and only through it)."""
    s = SERIES[0]
    _descriptive_tree(tmp_path, with_metadata=True)
    study = f"08-29-2017-DDSM-NA-{s.path.study_suffix}"
    old = tmp_path / "manifest-1600000000000" / "CBIS-DDSM" / s.path.folder / study
    renamed = old / "1.000000-full mammogram images-99999"
    (old / f"1.000000-{s.description}-{s.path.series_suffix}").rename(renamed)
    meta = tmp_path / "manifest-1600000000000" / "metadata.csv"
    text = meta.read_text()
    meta.write_text(text.replace(f"{s.description}-{s.path.series_suffix}", "full mammogram images-99999"))
    assert SeriesIndex.build(tmp_path).files_for(s.path) == [renamed / "1-1.dcm"]
    meta.unlink()
    with pytest.raises(BadItem, match="not found"):
        SeriesIndex.build(tmp_path).files_for(s.path)


def test_natural_file_order(tmp_path: Path) -> None:
    s = SERIES[0]
    folder = tmp_path / s.path.folder / s.path.study_uid / s.path.series_uid
    _write_files(folder, 11)
    files = SeriesIndex.build(tmp_path, "classic").files_for(s.path)
    assert [f.name for f in files] == [f"1-{k}.dcm" for k in range(1, 12)]


@pytest.mark.parametrize("builder", [_classic_tree, _jpeg_tree, lambda r: _descriptive_tree(r, False)])
def test_missing_series_is_a_bad_item_naming_the_csv_path(tmp_path: Path, builder) -> None:
    builder(tmp_path)
    index = SeriesIndex.build(tmp_path)
    raw = "Mass-Test_P_99999_LEFT_CC/1.3.6.1.4.1.9590.100.1.2.111/1.3.6.1.4.1.9590.100.1.2.222/000000.dcm"
    with pytest.raises(BadItem) as caught:
        index.files_for(parse_cbis_path(raw))
    assert caught.value.item == raw
    assert caught.value.reason == f"series 1.3.6.1.4.1.9590.100.1.2.222 not found under {tmp_path}"


def test_classic_series_filed_under_another_study_is_refused(tmp_path: Path) -> None:
    s = SERIES[0]
    _write_files(tmp_path / s.path.folder / "1.2.3.4" / s.path.series_uid, 1)
    with pytest.raises(BadItem, match="is filed under study 1.2.3.4"):
        SeriesIndex.build(tmp_path, "classic").files_for(s.path)


def test_descriptive_suffix_collision_is_refused(tmp_path: Path) -> None:
    _descriptive_tree(tmp_path, with_metadata=False)
    s = next(x for x in SERIES if x.n_files == 1)
    subject = tmp_path / "manifest-1600000000000" / "CBIS-DDSM" / s.path.folder
    study = subject / f"08-29-2017-DDSM-NA-{s.path.study_suffix}"
    _write_files(study / f"2.000000-NA-{s.path.series_suffix}", 1)
    with pytest.raises(BadItem, match="found in 2 folders"):
        SeriesIndex.build(tmp_path).files_for(s.path)


def test_hidden_folders_of_the_downloader_are_ignored(tmp_path: Path) -> None:
    _classic_tree(tmp_path)
    s = SERIES[0]
    leftover = tmp_path / ".partial" / f"{s.path.series_uid}.extract"
    _write_files(leftover / s.path.study_uid / s.path.series_uid, 1)
    index = SeriesIndex.build(tmp_path)
    assert all(".partial" not in str(f) for f in index.files_for(s.path))


def test_symlinks_leaving_the_root_are_bad_items(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    a, b, c = SERIES[0].path, SERIES[1].path, SERIES[2].path
    _write_files(outside / "series", 1)
    (root / a.folder / a.study_uid).mkdir(parents=True)
    os.symlink(outside / "series", root / a.folder / a.study_uid / a.series_uid)  # folder link
    folder_b = root / b.folder / b.study_uid / b.series_uid
    folder_b.mkdir(parents=True)
    os.symlink(outside / "series" / "1-1.dcm", folder_b / "1-1.dcm")  # file link
    inside = _write_files(root / "store" / "series-c", 1)  # a link that stays inside is fine
    (root / c.folder / c.study_uid).mkdir(parents=True)
    os.symlink(inside[0].parent, root / c.folder / c.study_uid / c.series_uid)
    index = SeriesIndex.build(root, "classic")
    with pytest.raises(BadItem, match="resolves outside the data root"):
        index.files_for(a)
    with pytest.raises(BadItem, match="1-1.dcm is a link that resolves outside the data root"):
        index.files_for(b)
    assert [f.read_bytes() for f in index.files_for(c)] == [inside[0].read_bytes()]


def test_detect_layout_explains_what_it_expected(tmp_path: Path) -> None:
    (tmp_path / "some" / "folder").mkdir(parents=True)
    with pytest.raises(ValueError, match="no CBIS-DDSM layout found under .*classic.*descriptive.*jpeg"):
        detect_layout(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        detect_layout(tmp_path / "absent")


def test_build_inventory(tmp_path: Path) -> None:
    expected = _classic_tree(tmp_path)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 1024)  # 256 KiB: head, middle and tail are distinct regions
    (tmp_path / ".done").mkdir()
    (tmp_path / ".done" / "x.json").write_text("{}")
    (tmp_path / "half.zip.part").write_bytes(b"partial")
    inventory = build_inventory(tmp_path)
    assert list(inventory.columns) == ["path", "size", "fingerprint"]
    n_files = sum(len(v) for v in expected.values()) + 1
    assert len(inventory) == n_files and inventory["path"].is_monotonic_increasing
    row = inventory.set_index("path").loc["big.bin"]
    assert row["size"] == 256 * 1024 and row["fingerprint"] == file_fingerprint(big)

    data = bytearray(big.read_bytes())
    data[-1] ^= 0xFF  # a change in the tail is seen
    big.write_bytes(bytes(data))
    tail_changed = file_fingerprint(big)
    assert tail_changed != row["fingerprint"]
    data[128 * 1024] ^= 0xFF  # a change in the middle is not: the documented price of reading 128 KiB
    big.write_bytes(bytes(data))
    assert file_fingerprint(big) == tail_changed
    big.write_bytes(bytes(data[:-1]))  # truncation is seen through the size
    assert file_fingerprint(big) != tail_changed
