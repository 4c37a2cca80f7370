"""Reading DICOM/JPEG/PNG mammograms: display orientation, VOI, PHI allow-list, precise rejections."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from mammo_core.dicom_io import (
    ALLOWED_FIELDS,
    read_dicom_header,
    read_dicom_image,
    read_image_file,
    read_mask_dicom,
    read_mask_file,
    safe_metadata,
)
from mammo_core.errors import BadItem

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "dicom-mg"
SENDS = FIXTURES / "openrem_MG-Im-GE-SenDS-scaled.dcm"
FOR_PRESENTATION = FIXTURES / "openrem_MG-Im-GE_Seno_1_ForPresentation.dcm"
FOR_PROCESSING = FIXTURES / "openrem_MG-Im-GE_Seno_1_ForProcessing.dcm"
HOLOGIC = FIXTURES / "openrem_MG-Im-Hologic-PropProj.dcm"
ALL_FIXTURES = [SENDS, FOR_PRESENTATION, FOR_PROCESSING, HOLOGIC]

IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
               "ReferringPhysicianName", "StudyDate", "InstitutionAddress", "DeviceSerialNumber",
               "StationName", "OperatorsName")
MG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"


def _pairs_order(values: np.ndarray) -> np.ndarray:
    """sign(values[i] - values[j]) for all pairs: the ordering of the pixels."""
    flat = values.astype(np.int64).ravel()
    return np.sign(flat[:, None] - flat[None, :])


# ---------------------------------------------------------------------------- real fixtures


def test_sends_monochrome1_is_inverted_and_spans_full_range():
    raw = pydicom.dcmread(SENDS).pixel_array
    image, meta = read_dicom_image(SENDS)
    assert image.dtype == np.uint16 and image.shape == (4, 4)
    # MONOCHROME1: the ordering of every pixel pair flips
    assert np.array_equal(_pairs_order(image), -_pairs_order(raw))
    # exact mapping: out = round(65535 * (hi - raw) / (hi - lo)), no window in this file
    lo, hi = int(raw.min()), int(raw.max())
    expected = np.rint(65535 * (hi - raw.astype(np.float64)) / (hi - lo)).astype(np.uint16)
    assert np.array_equal(image, expected)
    assert image.min() == 0 and image.max() == 65535
    assert meta["inverted"] is True and meta["voi"] == "none"
    assert meta["PhotometricInterpretation"] == "MONOCHROME1" and meta["value_range"] == [lo, hi]


def test_for_processing_monochrome1_inverted():
    raw = pydicom.dcmread(FOR_PROCESSING).pixel_array  # [[1137, 1130]]
    image, meta = read_dicom_image(FOR_PROCESSING)
    assert raw[0, 0] > raw[0, 1]
    assert image.tolist() == [[0, 65535]]
    assert meta["inverted"] is True and meta["BitsStored"] == 11


def test_for_presentation_sigmoid_multi_window_uses_first_window():
    ds = pydicom.dcmread(FOR_PRESENTATION)
    raw = ds.pixel_array
    image, meta = read_dicom_image(FOR_PRESENTATION)
    assert meta["voi"] == "window" and meta["VOILUTFunction"] == "SIGMOID"
    assert meta["WindowCenter"] == [2262.0, 2286.0, 2262.0]
    assert meta["inverted"] is False
    # monotone in the raw values and spanning the whole output range
    assert np.array_equal(np.sign(np.diff(image.astype(np.int64).ravel())),
                          np.sign(np.diff(raw.astype(np.int64).ravel())))
    assert image.min() == 0 and image.max() == 65535
    # value_range is the sigmoid of the FIRST window (c=2262, w=380) over the 12-bit output range
    sigmoid = 4095 / (1 + np.exp(-4 * (raw.astype(np.float64) - 2262) / 380))
    assert meta["value_range"] == pytest.approx([sigmoid.min(), sigmoid.max()], rel=1e-9)


def test_for_presentation_without_voi_is_raw_order():
    image, meta = read_dicom_image(FOR_PRESENTATION, apply_voi=False)
    assert meta["voi"] == "none" and meta["value_range"] == [2316.0, 2322.0]
    assert image.tolist() == [[0, 65535]]


def test_hologic_without_pixel_data_is_rejected_but_header_reads():
    with pytest.raises(BadItem) as info:
        read_dicom_image(HOLOGIC)
    assert info.value.reason == "no pixel data"
    assert info.value.item == str(HOLOGIC)
    with pytest.raises(BadItem, match="no pixel data"):
        read_mask_dicom(HOLOGIC)
    header = read_dicom_header(HOLOGIC)
    assert (header["Rows"], header["Columns"]) == (425, 266)
    assert header["Modality"] == "MG" and header["Laterality"] == "R"


@pytest.mark.parametrize("path", ALL_FIXTURES, ids=lambda p: p.name)
def test_no_identifying_value_reaches_metadata(path):
    ds = pydicom.dcmread(path)
    header = read_dicom_header(path)
    outputs = [json.dumps(safe_metadata(ds), ensure_ascii=False), json.dumps(header, ensure_ascii=False)]
    if "PixelData" in ds:
        outputs.append(json.dumps(read_dicom_image(path)[1], ensure_ascii=False))
    checked = 0
    for keyword in IDENTIFYING:
        value = str(ds.get(keyword, "") or "").strip()
        if not value:
            continue
        checked += 1
        for text in outputs:
            assert value not in text, keyword
            for part in value.split("^"):
                if len(part) >= 4:
                    assert part not in text, keyword
    assert checked >= 5  # every fixture carries names, IDs, dates and an institution
    assert str(ds.PatientName)  # the README promises a non-empty PatientName
    assert set(header) <= set(ALLOWED_FIELDS)


def test_allow_list_has_no_identifying_keywords():
    forbidden = ("Name", "Date", "Time", "Accession", "Institution", "Physician", "Serial",
                 "Station", "Address", "Birth", "InstanceUID", "Age", "Sex", "Comment", "Operator")
    bad = [k for k in ALLOWED_FIELDS for f in forbidden if f in k.replace("ModelName", "Model")]
    bad += [k for k in ALLOWED_FIELDS if re.search(r"(?<!U)ID", k)]  # PatientID, StudyID; not *UID
    assert bad == []
    needed = {"Rows", "Columns", "PhotometricInterpretation", "WindowCenter", "ViewPosition"}
    assert needed <= set(ALLOWED_FIELDS)


def test_free_text_containing_an_identifier_is_withheld():
    ds = pydicom.dcmread(SENDS, stop_before_pixels=True)
    ds.SeriesDescription = "left CC of Bịnhnhân"
    assert "SeriesDescription" not in safe_metadata(ds)
    ds.SeriesDescription = "full mammogram images"
    assert safe_metadata(ds)["SeriesDescription"] == "full mammogram images"


@pytest.mark.parametrize("plant", ["PatientAge", "OtherPatientNames", "PatientAddress", "nested_person",
                                   "AcquisitionDateTime"])
def test_free_text_containing_any_person_name_date_or_patient_field_is_withheld(plant):
    """Not only a fixed list of fields: every Patient-group element, person name and date, sequences too."""
    ds = pydicom.dcmread(SENDS, stop_before_pixels=True)
    value = {"PatientAge": "071Y", "AcquisitionDateTime": "20240229101500"}.get(plant, "Quenneville")
    if plant == "nested_person":
        item = Dataset()
        item.PersonName = "Quenneville^Odile"
        ds.PersonIdentificationCodeSequence = [item]
    else:
        setattr(ds, plant, value)
    ds.SeriesDescription = f"CC {value} series"
    assert "SeriesDescription" not in safe_metadata(ds)
    assert value not in json.dumps(safe_metadata(ds), ensure_ascii=False)


# ---------------------------------------------------------------------------- synthetic files


def _dataset(arr: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MG_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SYNTH0001"
    ds.set_pixel_data(arr, photometric, bits_stored or arr.dtype.itemsize * 8)
    return ds


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp(shape=(48, 64)) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(100, 4000, size=shape).astype(np.uint16)


def test_rescale_slope_monochrome2(tmp_path):
    arr = _ramp()
    ds = _dataset(arr, bits_stored=12)
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2.5, -100, "US"
    image, meta = read_dicom_image(_write(ds, tmp_path / "a.dcm"))
    modality = arr.astype(np.float64) * 2.5 - 100
    lo, hi = modality.min(), modality.max()
    assert meta["value_range"] == [lo, hi] and meta["RescaleSlope"] == 2.5
    assert np.array_equal(image, np.rint(65535 * (modality - lo) / (hi - lo)).astype(np.uint16))
    assert "Doe" not in json.dumps(meta) and "SYNTH0001" not in json.dumps(meta)
    assert np.array_equal(read_mask_dicom(tmp_path / "a.dcm"), arr)  # raw: no rescale


def test_signed_pixels_and_negative_slope(tmp_path):
    arr = np.array([[-300, -1, 0, 500]], dtype=np.int16)
    ds = _dataset(arr)
    ds.RescaleSlope, ds.RescaleIntercept = -1, 0
    image, _ = read_dicom_image(_write(ds, tmp_path / "s.dcm"))
    assert image.tolist() == [[65535, round(65535 * 501 / 800), round(65535 * 500 / 800), 0]]


def test_linear_window_clips_outside(tmp_path):
    arr = np.array([[0, 100, 150, 200, 4000]], dtype=np.uint16)
    ds = _dataset(arr, bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = 150, 101
    image, meta = read_dicom_image(_write(ds, tmp_path / "w.dcm"))
    assert meta["voi"] == "window"
    # PS3.3 C.11.2.1.2.1 LINEAR: x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 1;
    # else (x - (c - 0.5)) / (w - 1) + 0.5. Here c - 0.5 = 149.5, w - 1 = 100.
    assert image.tolist() == [[0, round(65535 * 0.005), round(65535 * 0.505), 65535, 65535]]
    raw_view, _ = read_dicom_image(tmp_path / "w.dcm", apply_voi=False)
    assert raw_view[0, 1] > 0 and raw_view[0, 3] < raw_view[0, 4]


def test_pixel_padding_maps_to_black_and_is_ignored_for_range(tmp_path):
    arr = np.array([[0, 0, 1000, 3000]], dtype=np.uint16)
    ds = _dataset(arr, photometric="MONOCHROME1", bits_stored=12)
    ds.PixelPaddingValue = 0
    image, meta = read_dicom_image(_write(ds, tmp_path / "p.dcm"))
    assert meta["value_range"] == [1000.0, 3000.0]
    assert image.tolist() == [[0, 0, 65535, 0]]


def test_rle_compressed(tmp_path):
    arr = _ramp()
    ds = _dataset(arr, bits_stored=16)
    ds.compress(RLELossless)
    path = _write(ds, tmp_path / "rle.dcm")
    image, meta = read_dicom_image(path)
    assert meta["TransferSyntaxUID"] == RLELossless
    assert np.array_equal(read_mask_dicom(path), arr)
    order = np.argsort(arr, axis=None, kind="stable")
    assert np.array_equal(np.argsort(image, axis=None, kind="stable"), order)


def test_jpeg2000_lossless_compressed(tmp_path):
    arr = _ramp()
    ds = _dataset(arr, bits_stored=12)
    ds.compress(JPEG2000Lossless)  # pylibjpeg-openjpeg encodes
    path = _write(ds, tmp_path / "j2k.dcm")
    assert np.array_equal(read_mask_dicom(path), arr)
    assert read_dicom_header(path)["TransferSyntaxUID"] == JPEG2000Lossless


def test_unsupported_transfer_syntax(tmp_path):
    ds = _dataset(_ramp())
    path = _write(ds, tmp_path / "mpeg.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 16])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(BadItem) as info:
        read_dicom_image(path)
    assert info.value.reason.startswith("unsupported transfer syntax 1.2.840.10008.1.2.4.100")


def test_truncated_file(tmp_path):
    path = _write(_dataset(_ramp()), tmp_path / "full.dcm")
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    for keep in (len(data) - 1000, len(data) - 1, 400):
        cut.write_bytes(data[:keep])
        with pytest.raises(BadItem) as info:
            read_dicom_image(cut)
        assert info.value.reason == "truncated DICOM", keep


def test_pixel_length_mismatch(tmp_path):
    ds = _dataset(_ramp((48, 64)))
    ds.Rows = 50  # header promises 2 more rows than the data holds
    path = _write(ds, tmp_path / "len.dcm")
    with pytest.raises(BadItem) as info:
        read_dicom_image(path)
    reason = info.value.reason
    assert reason.startswith("pixel data length does not match Rows x Columns x SamplesPerPixel x bits")
    assert "6144 bytes, expected 6400" in reason


def test_non_dicom_bytes_named_dcm(tmp_path):
    path = tmp_path / "fake.dcm"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path, format="PNG")  # a PNG in disguise
    for reader in (read_dicom_image, read_image_file, read_dicom_header, read_mask_file):
        with pytest.raises(BadItem) as info:
            reader(path)
        assert info.value.reason == "not a DICOM file", reader.__name__
    text = tmp_path / "notes.dcm"
    text.write_text("hello")
    with pytest.raises(BadItem, match="not a DICOM file"):
        read_image_file(text)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_float_pixels(tmp_path, bad):
    arr = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    arr[1, 2] = bad
    ds = _dataset(np.zeros((4, 4), np.uint16))
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored = 32, 32
    del ds.HighBit, ds.PixelRepresentation
    ds.FloatPixelData = arr.tobytes()
    path = _write(ds, tmp_path / "float.dcm")
    with pytest.raises(BadItem) as info:
        read_dicom_image(path)
    assert info.value.reason == "non-finite pixel values"


def test_finite_float_pixels_read(tmp_path):
    arr = np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)
    ds = _dataset(np.zeros((4, 4), np.uint16))
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored = 32, 32
    del ds.HighBit, ds.PixelRepresentation
    ds.FloatPixelData = arr.tobytes()
    image, meta = read_dicom_image(_write(ds, tmp_path / "float.dcm"))
    assert image[0, 0] == 0 and image[3, 3] == 65535 and np.all(np.diff(image.ravel().astype(int)) > 0)


def test_rgb_dicom_rejected(tmp_path):
    ds = _dataset(np.zeros((4, 4, 3), np.uint8), photometric="RGB")
    with pytest.raises(BadItem, match="unsupported photometric interpretation RGB"):
        read_dicom_image(_write(ds, tmp_path / "rgb.dcm"))


# ---------------------------------------------------------------------------- JPEG / PNG


def test_jpeg_and_png_scaling(tmp_path):
    grey = np.array([[0, 1, 128, 255]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "a.png")
    image, meta = read_image_file(tmp_path / "a.png")
    assert image.dtype == np.uint16 and image.tolist() == [[0, 257, 128 * 257, 65535]]
    assert meta["format"] == "PNG" and meta["source_bits"] == 8

    deep = np.array([[0, 1000, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "b.png")
    image, meta = read_image_file(tmp_path / "b.png")
    assert image.dtype == np.uint16 and image.tolist() == deep.tolist() and meta["source_bits"] == 16

    flat = np.full((16, 16), 200, np.uint8)
    Image.fromarray(flat).save(tmp_path / "c.jpg", quality=100)
    image, meta = read_image_file(tmp_path / "c.jpg")
    assert meta["format"] == "JPEG" and image.shape == (16, 16)
    assert abs(int(image.mean()) - 200 * 257) <= 2 * 257
    assert read_mask_file(tmp_path / "a.png").tolist() == grey.tolist()


def test_dicom_dispatch_and_unknown_format(tmp_path):
    image, meta = read_image_file(SENDS)
    assert np.array_equal(image, read_dicom_image(SENDS)[0]) and meta["Modality"] == "MG"
    (tmp_path / "x.tif").write_bytes(b"II*\x00" + b"\x00" * 200)
    with pytest.raises(BadItem, match="unsupported image format"):
        read_image_file(tmp_path / "x.tif")
    with pytest.raises(BadItem, match="file not found"):
        read_image_file(tmp_path / "missing.dcm")


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadItem, match="cannot decode image"):
        read_image_file(tmp_path / "t.jpg")


def test_jpeg_mask_snapped_to_binary_but_crop_kept(tmp_path):
    mask = np.zeros((64, 48), np.uint8)
    mask[10:30, 5:25] = 255
    mask[40:50, 30:44] = 255
    Image.fromarray(mask).save(tmp_path / "mask.jpg", quality=75)
    lossy = np.asarray(Image.open(tmp_path / "mask.jpg"))
    assert len(np.unique(lossy)) > 2  # JPEG really did blur the edges
    snapped = read_mask_file(tmp_path / "mask.jpg")
    assert set(np.unique(snapped).tolist()) == {0, 255}
    assert np.count_nonzero(snapped != mask) <= 0.01 * mask.size

    rng = np.random.default_rng(5)
    crop = rng.integers(60, 200, (64, 48), dtype=np.uint8)
    Image.fromarray(crop).save(tmp_path / "crop.jpg", quality=90)
    assert len(np.unique(read_mask_file(tmp_path / "crop.jpg"))) > 2
    Image.fromarray(lossy).save(tmp_path / "lossy.png")  # PNG is lossless: returned as stored
    assert np.array_equal(read_mask_file(tmp_path / "lossy.png"), lossy)


def test_missing_decoder_plugin_names_what_to_install(tmp_path, monkeypatch):
    ds = _dataset(_ramp(), bits_stored=12)
    ds.compress(JPEG2000Lossless)
    path = _write(ds, tmp_path / "j2k.dcm")

    class _NoPlugin:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg-openjpeg>=2.0"]

    monkeypatch.setattr("mammo_core.dicom_io.get_decoder", lambda uid: _NoPlugin())
    with pytest.raises(BadItem) as info:
        read_dicom_image(path)
    assert info.value.reason == (
        f"unsupported transfer syntax {JPEG2000Lossless} (JPEG 2000 Image Compression (Lossless Only)): "
        "install pylibjpeg - requires pylibjpeg-openjpeg>=2.0"
    )
