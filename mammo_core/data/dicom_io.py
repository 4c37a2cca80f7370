"""Reading mammograms (DICOM, or the JPEG/PNG re-packaging of CBIS-DDSM) into one pixel convention.

Every image leaves this module as a 2-D ``uint16`` array in *display orientation*: brighter means
denser tissue, whatever the vendor wrote (MONOCHROME1 or MONOCHROME2, rescaled or not, windowed or
not). Downstream code (patches, models) can then ignore photometric details entirely.

Metadata leaves this module only through :func:`safe_metadata`, an explicit allow-list: names,
dates, times, identifiers, institutions, physicians, stations and serial numbers never get out,
so nothing identifying a patient can reach a manifest, a log line or the tracking store.

Every problem with one file raises :class:`~mammo_core.errors.BadItem` with a precise reason, so
curation quarantines that file and carries on with the others.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_windowing, get_decoder
from pydicom.pixels import apply_voi as apply_voi_lut_sequence
from pydicom.valuerep import PersonName

from mammo_core.errors import BadItem

FULL_SCALE = 65535  # the output range of every reader: 0..FULL_SCALE, uint16
# Decoded pixel bytes an image may announce before anything is decoded (curate.max_image_mb overrides it).
# Why: a compressed codestream of a few KB can announce gigabytes; a 5000 x 4000 16-bit mammogram is 38 MiB.
DEFAULT_MAX_IMAGE_BYTES = 512 * 2**20
_HEADER_ALLOWANCE = 2**20  # a DICOM file may exceed its pixel bytes by its header

# Non-identifying DICOM keywords that may leave this module. Everything else is dropped.
# Deliberately absent: PatientName/ID/BirthDate/Sex/Age, every *Date and *Time, AccessionNumber,
# StudyID, every *InstanceUID (the caller already knows the UIDs from the CBIS CSV paths),
# InstitutionName/Address, ReferringPhysicianName, OperatorsName, StationName, DeviceSerialNumber,
# DetectorID, SoftwareVersions, ProtocolName, free-text comments and all private tags.
ALLOWED_FIELDS: tuple[str, ...] = (
    # what the object is
    "Modality",
    "SOPClassUID",  # a standard class ("Digital Mammography X-Ray Image"), not an instance
    "ImageType",
    "PresentationIntentType",
    "BodyPartExamined",
    "SeriesDescription",  # CBIS: "full mammogram images" / "ROI mask images" / "cropped images"
    "Manufacturer",
    "ManufacturerModelName",
    # view and orientation (PatientOrientation holds direction codes such as ["A", "R"], not identity)
    "ViewPosition",
    "ImageLaterality",
    "Laterality",
    "PatientOrientation",
    # pixel layout
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "PixelPaddingValue",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "BurnedInAnnotation",  # YES means the pixels themselves may carry text: worth knowing
    "LossyImageCompression",
    "TransferSyntaxUID",
    # intensity pipeline
    "PixelIntensityRelationship",
    "PixelIntensityRelationshipSign",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PresentationLUTShape",
)

# Values that identify a person or a place (with every person name, date and Patient-group element, see
# _identifying_strings). They are never output; any allowed value that happens to contain one of them
# (e.g. a SeriesDescription typed with the patient's name) is withheld.
_IDENTIFYING_FIELDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StationName",
    "DeviceSerialNumber",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
)
_MIN_IDENTIFYING_LEN = 4  # shorter values ("O", "M") would match harmless text by accident
_PATIENT_GROUP = 0x0010
_IDENTIFYING_VRS = ("PN", "DA", "DT")  # person names and dates, wherever they sit
# patient, clinical trial, general (study/series/equipment), acquisition, relationship, study, visit,
# procedure step, digital signatures, results
_DESCRIPTIVE_GROUPS = frozenset({0x0008, 0x0010, 0x0012, 0x0018, 0x0020, 0x0032, 0x0038, 0x0040, 0x0400,
                                 0x4008})

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DICOM_MAGIC_OFFSET = 128
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")


# ----------------------------------------------------------------------------------------------
# metadata


def safe_metadata(ds: Dataset) -> dict[str, Any]:
    """JSON-serialisable values of the allow-listed fields present in ``ds`` (and nothing else).

    Empty values, binary values and person names are skipped; an allowed value that contains an
    identifying value of the same file (see ``_IDENTIFYING_FIELDS``) is withheld as well.
    """
    identifying = _identifying_strings(ds)
    meta: dict[str, Any] = {}
    for keyword in ALLOWED_FIELDS:
        if keyword == "TransferSyntaxUID":
            file_meta = getattr(ds, "file_meta", None)
            raw = file_meta.get(keyword) if file_meta is not None else None
        else:
            raw = ds.get(keyword)
        value = _json_value(raw)
        if value is None or value == "" or value == []:
            continue
        text = json.dumps(value, ensure_ascii=False).lower()
        if any(ident in text for ident in identifying):
            continue
        meta[keyword] = value
    return meta


def _identifying_strings(ds: Dataset) -> set[str]:
    """Lower-case values that identify a person, a place or a time: the fields above, every element of
    the Patient group (0010,xxxx), and every person name and date anywhere, sequences included."""
    found: set[str] = set()
    for element in ds.iterall():
        if element.keyword in ALLOWED_FIELDS or element.VR == "SQ":
            continue
        if not (element.keyword in _IDENTIFYING_FIELDS or element.tag.group == _PATIENT_GROUP
                or element.VR in _IDENTIFYING_VRS):
            continue
        value = element.value
        values = list(value) if isinstance(value, MultiValue | list) else [value]
        for item in values:
            if item is None or isinstance(item, bytes | bytearray):
                continue
            parts = [str(item)]
            if isinstance(item, PersonName):
                parts += [c for c in item.components] + [p for p in str(item).split("^")]
            found.update(p.strip().lower() for p in parts if len(p.strip()) >= _MIN_IDENTIFYING_LEN)
    return found


def withheld_keyword(name: str) -> str | None:
    """The DICOM keyword ``name`` spells (case and separators ignored) if that element may not leave a
    DICOM, else None.

    Why: :data:`ALLOWED_FIELDS` is the one list of what may leave a DICOM. Other writers that take
    free-form keys (HDF5 attributes, ...) ask here, so that a key named after an identifying element
    (``PatientID``, ``patient_age``, ``InstitutionName``) is refused there as well. Only elements of the
    groups that describe a patient, a visit, a study, a series, equipment or a procedure, and every
    person name and date, count: generic words that happen to be DICOM keywords of other groups
    (``Copies``, ``Crop``) stay usable.
    """
    return _withheld_keywords().get("".join(ch for ch in name.lower() if ch.isalnum()))


@functools.cache
def _withheld_keywords() -> dict[str, str]:
    allowed = {k.lower() for k in ALLOWED_FIELDS}
    withheld: dict[str, str] = {}
    for tag, (vr, _vm, _name, _retired, keyword) in DicomDictionary.items():
        if keyword and keyword.lower() not in allowed and (
                tag >> 16 in _DESCRIPTIVE_GROUPS or vr in _IDENTIFYING_VRS):
            withheld[keyword.lower()] = keyword
    return withheld


def _json_value(value: Any) -> Any:
    """A plain JSON value for a DICOM value, or None when it has no safe plain form."""
    if value is None or isinstance(value, bytes | bytearray | PersonName | Dataset):
        return None
    if isinstance(value, MultiValue | list | tuple):
        items = [_json_value(v) for v in value]
        return None if any(v is None for v in items) else items
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return str(value).strip()
    if hasattr(value, "__float__"):  # DSdecimal
        number = float(value)
        return number if math.isfinite(number) else None
    return None


# ----------------------------------------------------------------------------------------------
# reading DICOM


class _ShortReadTracker:
    """A file wrapper that notices when pydicom asked for bytes the file did not have.

    pydicom stops silently at the end of a truncated file and returns a partial dataset, which
    would otherwise surface as a misleading "no pixel data" or a length mismatch. A read that
    returns fewer bytes than requested means the file ends inside an element. The one exception
    is the 8-byte probe for the next element's tag returning nothing: that is the normal end.
    """

    def __init__(self, fp: io.BufferedReader):
        self._fp = fp
        self.name = fp.name
        self.short_read = False

    def read(self, size: int = -1) -> bytes:
        data = self._fp.read(size)
        if size is not None and size > 0 and len(data) < size and not (len(data) == 0 and size == 8):
            self.short_read = True
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()


def _read_dataset(path: Path, *, stop_before_pixels: bool) -> Dataset:
    item = str(path)
    try:
        with open(path, "rb") as raw:
            tracker = _ShortReadTracker(raw)
            ds = pydicom.dcmread(tracker, stop_before_pixels=stop_before_pixels)  # type: ignore[arg-type]
    except InvalidDicomError:
        raise BadItem(item, "not a DICOM file") from None
    except FileNotFoundError:
        raise BadItem(item, "file not found") from None
    except EOFError:
        raise BadItem(item, "truncated DICOM") from None
    except OSError as exc:
        raise BadItem(item, f"cannot read file: {exc.strerror or type(exc).__name__}") from None
    except Exception as exc:  # pydicom raises assorted errors on corrupt headers
        raise BadItem(item, f"unreadable DICOM header: {type(exc).__name__}") from None
    if tracker.short_read:
        raise BadItem(item, "truncated DICOM")
    return ds


def read_dicom_header(path: Path) -> dict[str, Any]:
    """The safe metadata of a DICOM file without reading its pixels (cheap size/view checks)."""
    return safe_metadata(_read_dataset(Path(path), stop_before_pixels=True))


def _pixel_keyword(ds: Dataset) -> str | None:
    return next((k for k in _PIXEL_KEYWORDS if k in ds), None)


def check_declared_size(item: str, shape: str, n_bytes: int, max_bytes: int) -> None:
    """Refuse an image whose header announces more decoded bytes than ``max_bytes``, before decoding it."""
    if n_bytes > max_bytes:
        raise BadItem(
            item,
            f"image too large: header declares {shape} = {n_bytes / 2**20:.0f} MiB decoded, "
            f"limit {max_bytes / 2**20:.0f} MiB (curate.max_image_mb)",
        )


def _check_declared_dicom_size(ds: Dataset, item: str, max_bytes: int) -> None:
    try:
        dims = [int(ds.get(k) or 1) for k in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated")]
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise BadItem(item, "non-numeric Rows, Columns, SamplesPerPixel, BitsAllocated or NumberOfFrames") from None
    rows, cols, samples, bits = dims
    shape = f"{rows}x{cols}x{samples} samples x{bits} bits x{frames} frames"
    check_declared_size(item, shape, math.ceil(rows * cols * samples * bits * frames / 8), max_bytes)


def _check_decodable(ds: Dataset, item: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
    """Reject what cannot become a 2-D grey image, with the reason a person can act on.

    The declared size is checked first: nothing is decoded (compressed or not) for an image whose
    header announces more than ``max_bytes``.
    """
    keyword = _pixel_keyword(ds)
    if keyword is None:
        raise BadItem(item, "no pixel data")
    _check_declared_dicom_size(ds, item, max_bytes)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in _MONOCHROME:
        raise BadItem(item, f"unsupported photometric interpretation {photometric or '(missing)'}")
    for required in ("Rows", "Columns", "BitsAllocated"):
        if ds.get(required) in (None, ""):
            raise BadItem(item, f"missing {required}")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames != 1:
        raise BadItem(item, f"multi-frame image ({frames} frames) is not a single mammogram")

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        raise BadItem(item, "missing transfer syntax")
    if syntax.is_compressed and keyword == "PixelData":
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise BadItem(item, f"unsupported transfer syntax {syntax} ({syntax.name})") from None
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
            raise BadItem(item, f"unsupported transfer syntax {syntax} ({syntax.name}): install {needs}")
        return

    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.BitsAllocated)
    expected = math.ceil(rows * cols * samples * bits / 8)
    actual = len(ds[keyword].value or b"")
    # an odd-length value is padded to even length by one byte
    if actual != expected and not (expected % 2 == 1 and actual == expected + 1):
        raise BadItem(
            item,
            "pixel data length does not match Rows x Columns x SamplesPerPixel x bits: "
            f"{actual} bytes, expected {expected} ({rows}x{cols}x{samples}x{bits} bits)",
        )


def _decode_pixels(ds: Dataset, item: str, max_bytes: int) -> np.ndarray:
    _check_decodable(ds, item, max_bytes)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoder errors: corrupt codestream, inconsistent header
        syntax = ds.file_meta.TransferSyntaxUID
        raise BadItem(item, f"cannot decode pixel data ({syntax.name}): {type(exc).__name__}") from None
    if arr.ndim != 2:
        raise BadItem(item, f"pixel array has shape {arr.shape}, expected 2-D")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BadItem(item, "non-finite pixel values")
    return arr


def _read_for_pixels(path: Path, max_bytes: int) -> Dataset:
    """The whole dataset, unless the file alone is larger than the decoded limit (pydicom would read all
    of it into memory before the declared size could be checked)."""
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # _read_dataset names the problem
    if size - _HEADER_ALLOWANCE > max_bytes:
        raise BadItem(str(path), f"file too large: {size / 2**20:.0f} MiB on disk, more than the "
                                 f"{max_bytes / 2**20:.0f} MiB an image may decode to (curate.max_image_mb)")
    return _read_dataset(path, stop_before_pixels=False)


def read_mask_dicom(path: Path, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> np.ndarray:
    """The raw stored pixels of a DICOM (no rescale, VOI or inversion): masks and crops as written."""
    path = Path(path)
    ds = _read_for_pixels(path, max_bytes)
    return _decode_pixels(ds, str(path), max_bytes)


def read_dicom_image(
    path: Path, *, apply_voi: bool = True, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> tuple[np.ndarray, dict[str, Any]]:
    """The image as ``uint16`` in display orientation (brighter = denser), and its safe metadata.

    The exact mapping from a stored value ``s`` to the output:

    1. ``m = modality(s)``: the Modality LUT Sequence if present, else ``s * RescaleSlope +
       RescaleIntercept`` (identity when absent).
    2. ``v = voi(m)`` when ``apply_voi``: WindowCenter/WindowWidth if present (first value when
       multi-valued; VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID as in PS3.3 C.11.2.1.2), else
       the first VOI LUT Sequence item if present, else identity. The window wins over the LUT
       because it is what VOILUTFunction qualifies and what every vendor fills in.
    3. with ``lo``/``hi`` the smallest/largest ``v`` over this image's pixels:
       MONOCHROME2: ``out = round(65535 * (v - lo) / (hi - lo))``;
       MONOCHROME1: ``out = round(65535 * (hi - v) / (hi - lo))`` (inverted so brighter = denser).
       A constant image (``hi == lo``) maps to all zeros.
    4. Pixels equal to PixelPaddingValue (or within PixelPaddingValue..PixelPaddingRangeLimit) are
       not tissue: they are left out of ``lo``/``hi`` and map to 0 (black, like air).

    The metadata adds ``voi`` ("window", "lut" or "none"), ``inverted`` (bool) and
    ``value_range`` ([lo, hi]) to :func:`safe_metadata`.

    Speed: 8/16-bit data (every mammogram) is mapped through a lookup table over all possible
    stored values, so a 3000x5000 image costs one uint16 gather, not full-size float64 copies.
    """
    path = Path(path)
    item = str(path)
    ds = _read_for_pixels(path, max_bytes)
    arr = _decode_pixels(ds, item, max_bytes)
    inverted = str(ds.PhotometricInterpretation).strip() == "MONOCHROME1"
    voi_kind = _voi_kind(ds) if apply_voi else "none"

    def transform(values: np.ndarray) -> np.ndarray:
        out = apply_modality_lut(values, ds)
        try:
            if voi_kind == "window":
                out = apply_windowing(out, ds, index=0)
            elif voi_kind == "lut":
                out = apply_voi_lut_sequence(out, ds, index=0)
        except (ValueError, IndexError, KeyError, TypeError) as exc:
            raise BadItem(item, f"invalid VOI transform ({voi_kind}): {exc}") from None
        return np.asarray(out, dtype=np.float64)

    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        # rescale and windows are monotone; LUT sequences need not be
        monotone = voi_kind != "lut" and not ds.get("ModalityLUTSequence")
        image, lo, hi = _map_through_lut(arr, transform, inverted, _padding_range(ds), monotone)
    else:
        image, lo, hi = _map_directly(arr, transform, inverted)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise BadItem(item, "non-finite pixel values")

    meta = safe_metadata(ds)
    meta.update(voi=voi_kind, inverted=inverted, value_range=[lo, hi])
    return image, meta


def _voi_kind(ds: Dataset) -> str:
    if "WindowCenter" in ds and "WindowWidth" in ds and ds.WindowCenter != "" and ds.WindowWidth != "":
        return "window"
    if ds.get("VOILUTSequence"):
        return "lut"
    return "none"


def _scale_to_full(values: np.ndarray, lo: float, hi: float, inverted: bool) -> np.ndarray:
    """``values`` (float) -> uint16 by the affine map of :func:`read_dicom_image`, step 3."""
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint16)
    scaled = (values - lo) * (FULL_SCALE / (hi - lo))
    np.clip(scaled, 0, FULL_SCALE, out=scaled)
    np.rint(scaled, out=scaled)
    out = scaled.astype(np.uint16)
    if inverted:
        np.subtract(FULL_SCALE, out, out=out)
    return out


def _padding_range(ds: Dataset) -> tuple[int, int] | None:
    pad = ds.get("PixelPaddingValue")
    if not isinstance(pad, int):
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    limit = limit if isinstance(limit, int) else pad
    return min(pad, limit), max(pad, limit)


def _map_through_lut(
    arr: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray],
    inverted: bool,
    padding: tuple[int, int] | None,
    monotone: bool,
) -> tuple[np.ndarray, float, float]:
    """Apply a per-value transform to 8/16-bit data through a table over every possible value."""
    unsigned = np.dtype(f"u{arr.dtype.itemsize}")
    codes = np.arange(2 ** (8 * arr.dtype.itemsize), dtype=unsigned)
    domain = codes.view(arr.dtype)  # the stored value for each bit pattern (signed data too)
    mapped = transform(domain)
    keys = arr.view(unsigned)
    is_padding = np.zeros(codes.size, dtype=bool)
    if monotone and padding is None:
        # the extremes of a monotone map over the pixels sit at the smallest and largest pixel
        ends = mapped[np.array([arr.min(), arr.max()], dtype=arr.dtype).view(unsigned)]
        lo, hi = float(ends.min()), float(ends.max())
    else:
        # only the values that occur decide lo/hi (one scatter over the image)
        present = np.zeros(codes.size, dtype=bool)
        present[keys] = True
        if padding is not None:
            is_padding = (domain >= padding[0]) & (domain <= padding[1])
            if (present & ~is_padding).any():  # an image of padding only keeps its values
                present &= ~is_padding
            else:
                is_padding[:] = False
        lo = float(mapped[present].min())
        hi = float(mapped[present].max())
    table = _scale_to_full(mapped, lo, hi, inverted)
    table[is_padding] = 0
    return table[keys], lo, hi


def _map_directly(
    arr: np.ndarray, transform: Callable[[np.ndarray], np.ndarray], inverted: bool
) -> tuple[np.ndarray, float, float]:
    """Float or 32-bit data (rare in mammography): transform the image itself."""
    values = transform(arr)
    if not np.isfinite(values).all():
        return np.zeros(arr.shape, dtype=np.uint16), math.nan, math.nan
    lo, hi = float(values.min()), float(values.max())
    return _scale_to_full(values, lo, hi, inverted), lo, hi


# ----------------------------------------------------------------------------------------------
# any image file


def _sniff(path: Path) -> str:
    try:
        with open(path, "rb") as fp:
            head = fp.read(_DICOM_MAGIC_OFFSET + 4)
    except FileNotFoundError:
        raise BadItem(str(path), "file not found") from None
    except OSError as exc:
        raise BadItem(str(path), f"cannot read file: {exc.strerror or type(exc).__name__}") from None
    if head[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if path.suffix.lower() in _DICOM_SUFFIXES:
        raise BadItem(str(path), "not a DICOM file")
    raise BadItem(str(path), "unsupported image format (not DICOM, JPEG or PNG)")


_PIL_BITS_PER_PIXEL = {"1": 1, "L": 8, "P": 8, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}


def _read_pil(path: Path, max_bytes: int) -> tuple[np.ndarray, str, str]:
    """Decode a PNG/JPEG after checking the size its header declares.

    Two guards: Pillow's own MAX_IMAGE_PIXELS (set here from ``max_bytes``: one byte per pixel at least,
    so Pillow refuses at twice that in ``Image.open``), then the exact decoded bytes of the header's
    size and mode against ``max_bytes``, both before ``load()`` decodes anything.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_bytes
    try:
        with Image.open(path) as im:
            width, height = im.size
            bits = _PIL_BITS_PER_PIXEL.get(im.mode, 32)
            shape = f"{height}x{width} {im.mode} ({bits} bits per pixel)"
            check_declared_size(str(path), shape, math.ceil(width * height * bits / 8), max_bytes)
            im.load()
            fmt, mode = str(im.format), im.mode
            if mode not in ("L", "I;16", "I;16B", "I;16L", "I"):
                im = im.convert("L")  # RGB/palette/1-bit saves of grey images
            arr = np.asarray(im)
    except Image.DecompressionBombError as exc:
        raise BadItem(str(path), f"image too large: {exc} (curate.max_image_mb)") from None
    except (OSError, ValueError) as exc:
        raise BadItem(str(path), f"cannot decode image: {exc}") from None
    return arr, fmt, mode


def read_image_file(
    path: Path, *, apply_voi: bool = True, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> tuple[np.ndarray, dict[str, Any]]:
    """Any supported mammogram file -> (uint16 image, safe metadata), dispatched on content.

    DICOM goes through :func:`read_dicom_image`. JPEG/PNG (the CBIS JPEG re-packaging) are already
    display images: 8-bit values are scaled by 257 (0 -> 0, 255 -> 65535), 16-bit PNGs are kept.
    A ``.dcm`` file that is not DICOM is rejected as "not a DICOM file", whatever it contains.
    An image whose header declares more than ``max_bytes`` of decoded pixels is refused undecoded.
    """
    path = Path(path)
    kind = _sniff(path)
    if kind == "dicom":
        return read_dicom_image(path, apply_voi=apply_voi, max_bytes=max_bytes)
    if path.suffix.lower() in _DICOM_SUFFIXES:
        raise BadItem(str(path), "not a DICOM file")
    arr, fmt, mode = _read_pil(path, max_bytes)
    if arr.ndim != 2:
        raise BadItem(str(path), f"image has shape {arr.shape}, expected 2-D")
    if arr.dtype == np.uint8:
        image = arr.astype(np.uint16)
        image *= 257
        bits = 8
    else:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > FULL_SCALE):
            raise BadItem(str(path), f"{mode} image values outside 0..65535")
        image = arr.astype(np.uint16, copy=False)
        bits = 16
    meta = {"format": fmt, "mode": mode, "Rows": int(image.shape[0]), "Columns": int(image.shape[1]),
            "source_bits": bits}
    return image, meta


# A JPEG-compressed binary mask comes back with ringing around its edges. It still has almost
# no pixel far from both extremes, while a crop of breast tissue is mostly mid-grey.
_LOSSY_MASK_MARGIN = 32  # values within this of 0 or of the maximum count as an extreme
_LOSSY_MASK_MAX_MIDDLE = 0.01  # at most this fraction of pixels may lie in between


def _snap_lossy_mask(arr: np.ndarray) -> np.ndarray:
    """A JPEG'd binary mask back to {0, 255}; any other 8-bit image unchanged."""
    if arr.dtype != np.uint8 or arr.size == 0:
        return arr
    middle = np.count_nonzero((arr > _LOSSY_MASK_MARGIN) & (arr < 255 - _LOSSY_MASK_MARGIN))
    if middle > _LOSSY_MASK_MAX_MIDDLE * arr.size:
        return arr
    return np.where(arr >= 128, np.uint8(255), np.uint8(0))


def read_mask_file(path: Path, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> np.ndarray:
    """Raw pixels of a mask or crop file of any supported format (DICOM, PNG, JPEG), unscaled.

    JPEG is lossy, so the masks of the CBIS JPEG re-packaging are not exactly binary: a JPEG whose
    pixels are (almost) all near 0 or 255 is snapped to {0, 255} at 128, so that masks are still
    identified by content. DICOM and PNG pixels are returned exactly as stored.
    """
    path = Path(path)
    kind = _sniff(path)
    if kind == "dicom":
        return read_mask_dicom(path, max_bytes=max_bytes)
    if path.suffix.lower() in _DICOM_SUFFIXES:
        raise BadItem(str(path), "not a DICOM file")
    arr, _, _ = _read_pil(path, max_bytes)
    if arr.ndim != 2:
        raise BadItem(str(path), f"image has shape {arr.shape}, expected 2-D")
    return _snap_lossy_mask(arr) if kind == "jpeg" else arr
