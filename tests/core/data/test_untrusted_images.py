"""Images that try to exhaust memory or time: refused from their header, or isolated in their worker.

The files are real: DICOM written by pydicom (RLE and JPEG 2000 compressed by pydicom's own encoders,
JPEG-LS encapsulated as a codestream), PNG and JPEG written by Pillow, then given a header announcing
a huge image while the data stays a few KB. Decoding such a file would ask for gigabytes; the readers
must refuse it from the header alone, with a reason naming the declared size and the limit.
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from mammo_core.config import CurateParams
from mammo_core.data import dicom_io
from mammo_core.errors import BadItem
from mammo_core.runtime.isolation import ItemFailed, run_isolated

MG = "1.2.840.10008.5.1.4.1.1.1.2"
HUGE = 60000  # 60000 x 60000 x 16 bits = 6.7 GiB decoded


def mg_dataset(rows: int = 64, cols: int = 64) -> Dataset:
    """A valid uncompressed 16-bit MG image with a gradient (so compression has something to do)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MG, meta.MediaStorageSOPInstanceUID, "MG"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (np.arange(rows * cols, dtype=np.uint16) * 7).tobytes()
    return ds


def compressed_file(path: Path, syntax, *, rows: int, cols: int, frames: int | None = None) -> Path:
    """A real compressed 64x64 image whose header then announces ``rows`` x ``cols`` (x ``frames``)."""
    ds = mg_dataset()
    if syntax == JPEGLSLossless:  # no JPEG-LS encoder installed: a JPEG-LS-looking codestream is enough
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(200) + b"\xff\xd9"])
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    else:
        ds.compress(syntax)
    ds.Rows, ds.Columns = rows, cols
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=lambda s: s.name)
def test_a_compressed_dicom_announcing_a_huge_image_is_refused_before_decoding(tmp_path, syntax):
    path = compressed_file(tmp_path / "huge.dcm", syntax, rows=HUGE, cols=HUGE)
    assert path.stat().st_size < 20_000
    for read in (dicom_io.read_image_file, dicom_io.read_mask_file):
        with pytest.raises(BadItem) as err:
            read(path)
        assert err.value.item == str(path)
        assert err.value.reason == (
            f"image too large: header declares {HUGE}x{HUGE}x1 samples x16 bits x1 frames = 6866 MiB decoded, "
            "limit 512 MiB (curate.max_image_mb)"
        )


def test_the_same_compressed_file_with_its_true_header_decodes(tmp_path):
    """Control: the refusal above comes from the declared size, not from a broken file."""
    path = compressed_file(tmp_path / "ok.dcm", JPEG2000Lossless, rows=64, cols=64)
    image, meta = dicom_io.read_image_file(path)
    assert image.shape == (64, 64) and image.dtype == np.uint16 and meta["Rows"] == 64
    with pytest.raises(BadItem, match=r"image too large: header declares 64x64x1 samples x16 bits x1 frames"):
        dicom_io.read_image_file(path, max_bytes=64 * 64 * 2 - 1)  # the limit is configurable


def test_frames_count_towards_the_declared_size(tmp_path):
    path = compressed_file(tmp_path / "frames.dcm", RLELossless, rows=4096, cols=4096, frames=100)
    with pytest.raises(BadItem, match=r"4096x4096x1 samples x16 bits x100 frames = 3200 MiB decoded"):
        dicom_io.read_image_file(path)


def test_uncompressed_dicom_is_checked_too(tmp_path):
    ds = mg_dataset(rows=8, cols=8)
    ds.Rows = ds.Columns = HUGE
    ds.save_as(tmp_path / "raw.dcm", enforce_file_format=True)
    with pytest.raises(BadItem, match="image too large"):
        dicom_io.read_image_file(tmp_path / "raw.dcm")


def test_default_limit_is_far_above_a_real_mammogram():
    mammogram = 5000 * 4000 * 16 // 8
    assert CurateParams().max_image_mb * 2**20 >= 10 * mammogram
    dicom_io.check_declared_size("m.dcm", "5000x4000", mammogram, dicom_io.DEFAULT_MAX_IMAGE_BYTES)


def png_declaring(width: int, height: int, mode: str = "L") -> bytes:
    """A real 8x8 PNG whose IHDR (with a correct CRC) then declares ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.new(mode, (8, 8), 100).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_declaring(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 100).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_png_or_jpeg_announcing_a_huge_image_is_refused_by_pillows_limit(tmp_path, kind):
    path = tmp_path / f"huge.{kind}"
    path.write_bytes(png_declaring(100_000, 100_000) if kind == "png" else jpeg_declaring(65_000, 65_000))
    for read in (dicom_io.read_image_file, dicom_io.read_mask_file):
        with pytest.raises(BadItem) as err:
            read(path)
        assert err.value.item == str(path)
        assert err.value.reason.startswith("image too large: Image size (")
        assert err.value.reason.endswith("could be decompression bomb DOS attack. (curate.max_image_mb)")


def test_our_own_check_counts_bytes_per_pixel_where_pillows_pixel_count_passes(tmp_path):
    """30000 x 30000 16-bit: below Pillow's pixel limit for 1 GiB, but 1.7 GiB decoded."""
    path = tmp_path / "wide16.png"
    path.write_bytes(png_declaring(30_000, 30_000, mode="I;16"))
    with pytest.raises(BadItem) as err:
        dicom_io.read_image_file(path, max_bytes=2**30)
    assert err.value.reason == (
        "image too large: header declares 30000x30000 I;16 (16 bits per pixel) = 1717 MiB decoded, "
        "limit 1024 MiB (curate.max_image_mb)"
    )


# --------------------------------------------------------------------------------------------------
# worker isolation (mammo_core.runtime.isolation), with items that crash, hang or raise


def _behave(item: int) -> int:
    if item == 2:
        os._exit(3)  # a decoder that takes its process down
    if item == 4:
        time.sleep(3600)  # a decoder that never returns
    if item == 5:
        raise ValueError("bad item five")
    return item * 10


def test_one_item_that_kills_or_hangs_its_worker_costs_only_itself():
    seen: list[tuple[int, int]] = []
    start = time.monotonic()
    results = run_isolated(_behave, list(range(8)), workers=2, time_limit_s=1.0,
                           progress=lambda done, total: seen.append((done, total)))
    elapsed = time.monotonic() - start
    assert [r for i, r in enumerate(results) if i not in (2, 4, 5)] == [0, 10, 30, 60, 70]
    assert results[2] == ItemFailed(
        "its worker process died (exit code 3); first attempt: its worker process died (exit code 3); "
        "given up after a retry alone"
    )
    assert results[4] == ItemFailed(
        "it ran longer than the time limit of 1 s per item; first attempt: it ran longer than the time limit "
        "of 1 s per item; given up after a retry alone"
    )
    assert results[5] == ItemFailed("ValueError: bad item five")
    assert seen == [(i, 8) for i in range(1, 9)]
    assert 2.0 <= elapsed < 20  # the hang cost its limit twice (first try, retry alone), not forever


def test_a_dicom_file_larger_than_the_limit_is_refused_before_it_is_read(tmp_path):
    """A (sparse) 2 GiB file would be read whole into memory by pydicom before any header check."""
    path = tmp_path / "big.dcm"
    mg_dataset(rows=8, cols=8).save_as(path, enforce_file_format=True)
    with open(path, "r+b") as fh:
        fh.truncate(2 << 30)  # sparse: no disk used
    with pytest.raises(BadItem) as err:
        dicom_io.read_image_file(path)
    assert err.value.reason == ("file too large: 2048 MiB on disk, more than the 512 MiB an image may decode to "
                                "(curate.max_image_mb)")
