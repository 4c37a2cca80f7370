"""Generate the bad-input corpus: every kind of broken input issue 9 lists, written fresh into a folder.

Why generated and not committed: broken binaries checked into git cannot be reviewed, drift from the
code that reads them, and a "truncated DICOM" nobody can regenerate says nothing about how it was cut.
This script writes the same bytes for the same arguments (a seeded phantom, fixed edits), so a test
calls it into a temporary folder and knows exactly what it injected where.

Layout of ``OUT``::

    clean/      a seeded CBIS-DDSM phantom (classic NBIA layout), untouched: the baseline
    phantom/    the same phantom with bad items injected (images, masks, CSV paths), one item each
    files/      stand-alone bad inputs: case CSVs lacking a column, zips escaping their folder, corrupt
                HDF5 files (loose and inside a sealed stage folder), checkpoints of another architecture
                or carrying a code-running pickle, a params file with a typo'd key
    corpus.json what was injected: per item its name, the issue's wording, and the file/row/id it hit

Usage: ``python tests/data/bad/generate.py OUT`` (or :func:`generate` from a test).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import pathlib
import shutil
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:  # run as a script: make mammo_core and tests importable
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from mammo_core.data import cbis_tables  # noqa: E402
from mammo_core.models.fused import FusedDenseNet  # noqa: E402
from mammo_core.sources import phantom  # noqa: E402
from mammo_core.storage.h5io import ChunkedH5Writer, DatasetSpec  # noqa: E402
from mammo_core.storage.store import ArtifactStore  # noqa: E402
from mammo_core.training.checkpoint import CHECKPOINT_NAME, FORMAT_VERSION, save_atomic  # noqa: E402
from tests.helpers import layout_builders as lb  # noqa: E402

N_PATIENTS, SEED, SHAPE = 14, 5, (256, 160)
CHECKPOINT_CLASSES, EXPECTED_CLASSES = 5, 7  # a 'five'-class run's checkpoint found by a 'seven'-class run
SMOKE = REPO / "params" / "smoke.yaml"


@dataclass(frozen=True)
class Injected:
    """One bad input: ``name`` (stable id), ``issue`` (the issue's words), what it hit, where it lies."""

    name: str
    issue: str
    target: str  # image | lesion | csv_row | file
    item: str  # image_id, lesion_id, "<csv file>:row <n>", or a path relative to OUT
    path: str  # the file written, relative to OUT


class _PicklePayload:
    """Unpickling this runs ``Path.touch(marker)``: a harmless stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


# ------------------------------------------------------------------------------------- phantom items


def _float_dicom(path: Path, bad: float) -> None:
    """Rewrite ``path`` with 32-bit float pixels (FloatPixelData) holding one ``bad`` value."""
    ds = pydicom.dcmread(path)
    rows, cols = int(ds.Rows), int(ds.Columns)
    pixels = np.linspace(0.0, 1.0, rows * cols, dtype=np.float32).reshape(rows, cols)
    pixels[rows // 2, cols // 2] = bad
    del ds.PixelData
    for keyword in ("HighBit", "PixelRepresentation", "WindowCenter", "WindowWidth", "RescaleIntercept",
                    "RescaleSlope"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.BitsAllocated, ds.BitsStored = 32, 32
    ds.FloatPixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _full_file(root: Path, image_path: str) -> Path:
    (full,) = sorted(lb.series_dir_of(root, image_path).glob("*.dcm"))
    return full


def _pick_targets(root: Path) -> tuple[list[str], dict[str, object]]:
    """Deterministic targets: single-series, single-lesion images for image faults; lesions elsewhere."""
    table = cbis_tables.load_case_tables(cbis_tables.find_case_csvs(root))
    images, lesions = cbis_tables.build_images(table.rows)
    per_image = lesions["image_id"].value_counts()
    images = images.sort_values("image_id")
    single = images[(images["full_series_uids"].str.len() == 1) & (images["image_id"].map(per_image) == 1)]
    bad_images = list(single["image_id"][:6])
    rest = lesions[~lesions["image_id"].isin(bad_images)].sort_values("lesion_id")
    multi = rest[rest["image_id"].map(per_image) > 1]
    csv_rows = []
    for _image_id, group in multi.groupby("image_id", sort=True):  # one row per multi-lesion image
        row = group.iloc[0]
        raw = (root / row["source_file"]).read_bytes()
        if raw.count(row["mask_path"].encode()) == 1:
            csv_rows.append(row)
        if len(csv_rows) == 2:
            break
    used = {r["lesion_id"] for r in csv_rows}
    free = rest[~rest["lesion_id"].isin(used)]
    same_series = free[free["crop_series_uid"] == free["mask_series_uid"]]
    empty = same_series.iloc[0]
    free = free[free["lesion_id"] != empty["lesion_id"]]
    wrong_aspect, half_size = free.iloc[0], free.iloc[1]
    if len(csv_rows) < 2:
        raise RuntimeError("the phantom has too few multi-lesion images for the CSV items; raise N_PATIENTS")
    return bad_images, {"csv": csv_rows, "empty": empty, "aspect": wrong_aspect, "half": half_size,
                        "images": images.set_index("image_id")}


def inject_phantom(out: Path) -> list[Injected]:
    """Write ``clean/`` and ``phantom/`` (a copy with one bad item per kind) under ``out``."""
    clean, root = out / "clean", out / "phantom"
    phantom.generate_phantom(clean, n_patients=N_PATIENTS, seed=SEED, image_shape=SHAPE, workers=1)
    shutil.copytree(clean, root)
    bad_images, t = _pick_targets(root)
    images = t["images"]
    done: list[Injected] = []

    def rel(p: Path) -> str:
        return p.relative_to(out).as_posix()

    def image_item(name: str, issue: str, image_id: str, edit) -> None:
        full = _full_file(root, images.loc[image_id, "image_path"])
        edit(full)
        done.append(Injected(name, issue, "image", image_id, rel(full)))

    def truncate(p: Path) -> None:
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    def wrong_length(p: Path) -> None:
        ds = pydicom.dcmread(p)
        ds.Rows = int(ds.Rows) + 2  # the header promises two rows more than the pixel data holds
        ds.save_as(p, enforce_file_format=True)

    def no_pixels(p: Path) -> None:
        ds = pydicom.dcmread(p)
        del ds.PixelData
        ds.save_as(p, enforce_file_format=True)

    def not_dicom(p: Path) -> None:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
        p.write_bytes(buf.getvalue())  # a PNG under a .dcm name (e.g. an error page saved as the file)

    image_item("truncated_dicom", "truncated DICOM", bad_images[0], truncate)
    image_item("dicom_wrong_pixel_length", "DICOM with wrong pixel length", bad_images[1], wrong_length)
    image_item("dicom_without_pixel_data", "DICOM without pixel data", bad_images[2], no_pixels)
    image_item("not_dicom_named_dcm", "non-DICOM file with .dcm name", bad_images[3], not_dicom)
    image_item("nan_pixels", "NaN pixels", bad_images[4], lambda p: _float_dicom(p, float("nan")))
    image_item("infinite_pixels", "infinite pixels", bad_images[5], lambda p: _float_dicom(p, float("inf")))

    def mask_item(name: str, issue: str, lesion, reshape) -> None:
        mask_file = lb.mask_file_of(root, lesion["crop_path"], lesion["mask_path"], SHAPE)
        lb.rewrite_pixels(mask_file, reshape(pydicom.dcmread(mask_file).pixel_array))
        done.append(Injected(name, issue, "lesion", lesion["lesion_id"], rel(mask_file)))

    mask_item("mask_wrong_aspect", "mask of wrong size or aspect", t["aspect"],
              lambda m: np.pad(m, ((0, 0), (0, SHAPE[1] // 2))))  # wider: lesion kept, aspect broken
    mask_item("mask_half_size_same_aspect", "mask of wrong size or aspect", t["half"], lambda m: m[::2, ::2])
    mask_item("empty_mask", "empty mask", t["empty"], np.zeros_like)

    for row, (name, issue) in zip(t["csv"], [("csv_path_dotdot", "CSV path escaping the data root (../)"),
                                             ("csv_path_absolute", "CSV path escaping the data root (absolute)")],
                                  strict=True):
        csv_file = root / row["source_file"]
        folder, _study, series, filename = row["mask_path"].split("/")
        evil = f"{folder}/../../../{series}/{filename}" if name.endswith("dotdot") else \
            f"/{folder}/{_study}/{series}/{filename}"
        data = csv_file.read_bytes()
        csv_file.write_bytes(data.replace(row["mask_path"].encode(), evil.encode()))
        done.append(Injected(name, issue, "csv_row", f"{row['source_file']}:row {row['source_row']}",
                             rel(csv_file)))
    return done


# ------------------------------------------------------------------------------------ stand-alone items


def _csv_with_column_edit(src: Path, dst: Path, csv_name: str, drop: str | None, rename: tuple[str, str] | None):
    lb.copy_case_csvs(src, dst)
    path = dst / csv_name
    with open(path, newline="", encoding="utf-8") as fh:
        records = list(csv.reader(fh))
    header = records[0]
    if drop is not None:
        i = header.index(drop)
        records = [r[:i] + r[i + 1:] for r in records]
    if rename is not None:
        header[header.index(rename[0])] = rename[1]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\r\n").writerows(records)
    return path


def _zip(path: Path, entries: list[str]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("1.3.6.1.4.1.9590.100.1.2.1/1-1.dcm", b"DICM" * 16)  # a harmless good entry first
        for name in entries:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            z.writestr(info, b"escaped\n")


def _h5(path: Path) -> None:
    spec = [DatasetSpec("x", np.float32, (4,)), DatasetSpec("label", np.int64)]
    with ChunkedH5Writer(path, spec) as writer:
        writer.set_attrs(classes=["A", "B"])
        writer.append(x=np.arange(64, dtype=np.float32).reshape(16, 4), label=np.arange(16) % 2)


def write_files(out: Path) -> list[Injected]:
    """Write the stand-alone bad inputs under ``out/files``."""
    files = out / "files"
    files.mkdir(parents=True)
    done: list[Injected] = []

    def rel(p: Path) -> str:
        return p.relative_to(out).as_posix()

    missing = _csv_with_column_edit(out / "clean", files / "csv_missing_column",
                                    "mass_case_description_train_set.csv", drop="pathology", rename=None)
    done.append(Injected("csv_missing_column", "CSV with missing columns", "file", rel(missing), rel(missing)))
    renamed = _csv_with_column_edit(out / "clean", files / "csv_renamed_column",
                                    "calc_case_description_train_set.csv", drop=None, rename=("image view", "view"))
    done.append(Injected("csv_renamed_column", "CSV with renamed columns", "file", rel(renamed), rel(renamed)))

    dotdot, absolute = files / "zip_dotdot.zip", files / "zip_absolute.zip"
    _zip(dotdot, ["../escaped-by-zip.txt"])
    _zip(absolute, ["/tmp/escaped-by-zip-absolute.txt"])
    done.append(Injected("zip_entry_dotdot", "zip with an entry escaping its folder", "file",
                         "../escaped-by-zip.txt", rel(dotdot)))
    done.append(Injected("zip_entry_absolute", "zip with an entry escaping its folder", "file",
                         "/tmp/escaped-by-zip-absolute.txt", rel(absolute)))

    good = files / "h5" / "good.h5"
    _h5(good)
    data = good.read_bytes()
    truncated, overwritten = files / "h5" / "truncated.h5", files / "h5" / "overwritten_header.h5"
    truncated.write_bytes(data[: len(data) // 2])
    overwritten.write_bytes(b"\0" * 512 + data[512:])
    done.append(Injected("h5_truncated", "a corrupted HDF5 file", "file", rel(truncated), rel(truncated)))
    done.append(Injected("h5_overwritten_header", "a corrupted HDF5 file", "file", rel(overwritten),
                         rel(overwritten)))
    # the same damage inside a sealed stage folder: the manifest's sha256 must catch it
    store = ArtifactStore(files / "store")
    tmp = store.begin("patches", "k" * 64)
    _h5(tmp / "patches.h5")
    (tmp / "notes.txt").write_text("kept\n")
    sealed = store.seal("patches", "k" * 64, tmp, params={}, upstream={}, metrics={}, mlflow_run_id=None)
    sealed_h5 = sealed.path / "patches.h5"
    blob = bytearray(sealed_h5.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte in the middle: h5py may still open it
    sealed_h5.write_bytes(bytes(blob))
    done.append(Injected("h5_corrupted_in_sealed_stage", "a corrupted HDF5 file", "file", rel(sealed_h5),
                         rel(sealed_h5)))

    other = files / "checkpoint_other_architecture" / CHECKPOINT_NAME
    net = FusedDenseNet(CHECKPOINT_CLASSES, seed=0)
    save_atomic({"format": FORMAT_VERSION, "model": net.state_dict()}, other)
    done.append(Injected("checkpoint_other_architecture", "a checkpoint from another architecture", "file",
                         rel(other), rel(other)))
    payload = files / "checkpoint_pickle_payload" / CHECKPOINT_NAME
    payload.parent.mkdir(parents=True)
    torch.save({"format": FORMAT_VERSION, "model": _PicklePayload(files / "PAYLOAD_RAN")}, payload)
    done.append(Injected("checkpoint_pickle_payload", "a crafted pickle payload in a checkpoint", "file",
                         rel(payload), rel(payload)))

    typo = files / "params_typo.yaml"
    text = SMOKE.read_text(encoding="utf-8")
    assert text.count("  max_side:") == 1
    typo.write_text(text.replace("  max_side:", "  max_sid:"), encoding="utf-8")
    done.append(Injected("params_typo_key", "a params file with a typo'd key", "file", rel(typo), rel(typo)))
    return done


def generate(out: str | Path) -> list[Injected]:
    """Write the whole corpus under ``out`` (which must not exist or be empty) and ``out/corpus.json``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    items = inject_phantom(out) + write_files(out)
    (out / "corpus.json").write_text(json.dumps([asdict(i) for i in items], indent=1) + "\n", encoding="utf-8")
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the corpus into (new or empty)")
    args = parser.parse_args(argv)
    for item in generate(args.out):
        print(f"{item.name:32s} {item.target:8s} {item.item}")


if __name__ == "__main__":
    main()
