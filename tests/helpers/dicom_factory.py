"""Mammography DICOM files equivalent to the four vendor cases of ``../shared/fixtures/dicom-mg/``.

The vendor files (OpenREM test data, GPLv3) may not be copied into the repository, yet the reader and
the PHI guard must be tested on a clone with nothing beside it. This module writes, with pydicom, files
that carry the properties that folder's README lists and the tests rely on:

- ``sends_monochrome1_14bit``: MONOCHROME1 (inverted), 14 bits stored, FOR PROCESSING, 4x4 pixels, no
  window, Presentation LUT Shape INVERSE, UTF-8 (ISO_IR 192) identifiers in Latin, Vietnamese, Chinese
  and Cyrillic script, the patient's birth date equal to the study date.
- ``seno_for_presentation``: MONOCHROME2, 12 bits, 1x2 pixels, three WindowCenter/Width pairs with
  VOILUTFunction SIGMOID *and* a three-item VOI LUT Sequence (the window must win), PixelPaddingValue 0,
  default character set, a 16-digit patient ID and accession number.
- ``seno_for_processing``: MONOCHROME1, 11 bits, FOR PROCESSING, 1x2 pixels, same patient and study.
- ``hologic_no_pixel_data``: modality MG but no PixelData (Secondary Capture class, 425x266 declared,
  Laterality instead of ImageLaterality), ISO_IR 100 identifiers including an operator's name.

The GE-like cases carry an Icon Image Sequence with its own (nested) PixelData and a private block, as
the vendor files do: a reader must take the top-level pixels and ignore both. Pixel values, windows, bit
depths and sizes equal the vendor files' (numbers the tests assert); every identifying value (names, IDs,
dates, places, devices) is invented here. Files are deterministic: same bytes on every call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

CASES: tuple[str, ...] = (
    "sends_monochrome1_14bit",
    "seno_for_presentation",
    "seno_for_processing",
    "hologic_no_pixel_data",
)
NO_PIXEL_CASE = "hologic_no_pixel_data"

# The stored pixels of the cases that have them (the vendor files' values).
PIXELS: dict[str, list[list[int]]] = {
    "sends_monochrome1_14bit": [[1063, 5396, 15963, 16383], [996, 1005, 10940, 16383],
                                [997, 1014, 11068, 16383], [1079, 5777, 16026, 16383]],
    "seno_for_presentation": [[2316, 2322]],
    "seno_for_processing": [[1137, 1130]],
}


def _uid(*parts: str) -> str:
    """A deterministic UID under pydicom's root, from the case and the role it plays."""
    return generate_uid(entropy_srcs=["mammo-fusion tests.helpers.dicom_factory", *parts])


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _base(case: str, sop_class: str, charset: str | None) -> Dataset:
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, _uid(case, "sop"))
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.ConversionType = "WSD"
    ds.BodyPartExamined = "BREAST"
    ds.PatientSex = "O"
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = _uid(case, "series")
    ds.InstanceNumber = 1
    return ds


def _dates(ds: Dataset, day: str) -> None:
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = day
    ds.StudyTime, ds.SeriesTime, ds.AcquisitionTime, ds.ContentTime = "101500", "102010", "102005", "102012"


def _pixels(ds: Dataset, values: list[list[int]], bits_stored: int) -> None:
    arr = np.array(values, dtype=np.uint16)
    assert int(arr.max()) < 2**bits_stored, "stored values must fit BitsStored"
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OW"


def _icon(rows: int = 4, columns: int = 3) -> Sequence:
    """An 8-bit MONOCHROME2 thumbnail: nested PixelData a reader must not mistake for the image."""
    icon = Dataset()
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.Rows, icon.Columns = rows, columns
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = np.arange(rows * columns, dtype=np.uint8).tobytes()
    icon["PixelData"].VR = "OB"
    return Sequence([icon])


def _code(value: str, meaning: str) -> Sequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SNM3", meaning
    return Sequence([item])


def _ge_common(ds: Dataset, case: str) -> None:
    """What the GE Senographe files share: device, view, rescale identity, private block, icon."""
    ds.ImageType = ["DERIVED", "PRIMARY", ""]
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.ManufacturerModelName = "Senograph DS ADS_43.10.1"
    ds.DerivationDescription = "Scaled image"
    ds.AnatomicRegionSequence = _code("T-04000", "BREAST")
    ds.ViewCodeSequence = _code("R-10242", "cranio-caudal")
    ds.ViewPosition = "CC"
    ds.ImageLaterality = "L"
    ds.NumberOfFrames = 1
    ds.ImagerPixelSpacing = [0.094090909, 0.094090909]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.QualityControlImage, ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "NO", "00"
    source = Dataset()
    source.ReferencedSOPClassUID = MG_FOR_PROCESSING
    source.ReferencedSOPInstanceUID = _uid(case, "source")
    ds.SourceImageSequence = Sequence([source])
    block = ds.private_block(0x0045, "GEMS_SENO_02", create=True)
    block.add_new(0x1B, "CS", "LCC")  # Clinical View
    block.add_new(0x29, "DS", [1100, 4.4])  # Windowing parameters
    ds.IconImageSequence = _icon()


def _sends() -> Dataset:
    case = "sends_monochrome1_14bit"
    ds = _base(case, MG_FOR_PROCESSING, "ISO_IR 192")
    _ge_common(ds, case)
    _dates(ds, "20110923")
    ds.PresentationIntentType = "FOR PROCESSING"
    ds.PatientName = "Radiografía^Thửnghiệm"
    ds.PatientID = "SYNT4821"
    ds.PatientBirthDate = "20110923"  # the same as the study date, as in the vendor file
    ds.PatientAge = "001D"
    ds.AccessionNumber = "QXZW5173"
    ds.InstitutionName = "东区医院"
    ds.InstitutionAddress = "Новосибирск"
    ds.StationName = "SYNTHDS01"
    ds.DeviceSerialNumber = "5f3c9a21"
    ds.DetectorID = "65432"
    ds.DateOfLastDetectorCalibration = "20110601"
    ds.StudyID = "27391"
    ds.StudyInstanceUID = _uid(case, "study")
    ds.SeriesNumber = 61002
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PresentationLUTShape = "INVERSE"
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
    ds.PatientOrientation = ["A", "R"]
    ds.PixelSpacing = [53.961136, 45.0225]
    _pixels(ds, PIXELS[case], bits_stored=14)
    return ds


def _seno(case: str) -> Dataset:
    """The For Presentation / For Processing pair of one GE Seno study (same patient, same study)."""
    presentation = case == "seno_for_presentation"
    ds = _base(case, MG_FOR_PRESENTATION if presentation else MG_FOR_PROCESSING, None)
    _ge_common(ds, case)
    _dates(ds, "20120708")
    ds.PresentationIntentType = "FOR PRESENTATION" if presentation else "FOR PROCESSING"
    ds.PatientName = "Synthetic^MGCases"
    ds.PatientID = "7305912846150273"
    ds.PatientBirthDate = "20120708"
    ds.PatientAge = "001D"
    ds.AccessionNumber = "4418260937715502"
    ds.InstitutionName = "Synthetic Imaging Trust"
    ds.InstitutionAddress = ""
    ds.StationName = "SYNTHMG"
    ds.DetectorID = "QA771_05"
    ds.DateOfLastDetectorCalibration = "20120102"
    ds.StudyID = "27392"
    ds.StudyInstanceUID = _uid("seno", "study")  # one study for both
    ds.SeriesNumber = 61004 if presentation else 61003
    ds.PatientOrientation = ["R", "P"]
    ds.PixelSpacing = [74.708182, 46.575]
    if presentation:
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PresentationLUTShape = "IDENTITY"
        ds.PixelPaddingValue = 0
        ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", -1
        ds.WindowCenter = [2262, 2286, 2262]
        ds.WindowWidth = [380, 380, 500]
        ds.WindowCenterWidthExplanation = ["NORMAL", "HARDER", "SOFTER"]
        ds.VOILUTFunction = "SIGMOID"
        ds.VOILUTSequence = Sequence([_voi_lut(first, explanation)
                                      for first, explanation in ((2290, "NORMAL"), (2295, "HARDER"), (2280, "SOFTER"))])
        _pixels(ds, PIXELS[case], bits_stored=12)
    else:
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PresentationLUTShape = "INVERSE"
        ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
        _pixels(ds, PIXELS[case], bits_stored=11)
    return ds


def _voi_lut(first_mapped: int, explanation: str, entries: int = 64) -> Dataset:
    """A linear 12-bit VOI LUT: applied instead of the window it would give values no sigmoid gives."""
    item = Dataset()
    item.LUTDescriptor = [entries, first_mapped, 12]
    item.LUTExplanation = explanation
    item.LUTData = np.linspace(0, 4095, entries).round().astype(int).tolist()
    item["LUTDescriptor"].VR = "US"
    item["LUTData"].VR = "US"
    return item


def _hologic() -> Dataset:
    case = "hologic_no_pixel_data"
    ds = _base(case, SECONDARY_CAPTURE, "ISO_IR 100")
    _dates(ds, "20150817")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Manufacturer = "HOLOGIC, Inc."
    ds.ManufacturerModelName = "Selenia Dimensions"
    ds.StudyDescription = ds.PerformedProcedureStepDescription = "No Views"
    ds.SeriesDescription = ds.ProtocolName = "Flat Field Tomo"
    ds.PatientName = "Physique^FantômeRotatif"
    ds.PatientID = "phy24680FantRot"
    ds.PatientBirthDate = "19220817"
    ds.PatientAge = "093Y"
    ds.AccessionNumber = "70004123985"
    ds.InstitutionName = "Harbour Breast Centre"
    ds.InstitutionAddress = "Quay Lane, Harbourtown"
    ds.StationName = "SYN_HOL_DIM"
    ds.OperatorsName = "Jones^Annette"
    ds.DeviceSerialNumber = "71009872345"
    ds.DetectorID = "XK902286"
    ds.DateOfLastDetectorCalibration = "20150816"
    ds.StudyID = "S05566120000B"
    ds.StudyInstanceUID = _uid(case, "study")
    ds.SeriesNumber = 72000000
    ds.InstanceNumber = 60
    ds.ViewPosition = "FLATFIELD"
    ds.Laterality = "R"  # series-level laterality; no ImageLaterality in this file
    ds.PatientOrientation = ["P", "L"]
    ds.ViewCodeSequence = _code("R-10242", "cranio-caudal")
    # the image pixel module is complete except for the pixels themselves
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.Rows, ds.Columns = 425, 266
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 14, 13, 0
    ds.WindowCenter, ds.WindowWidth = 109, 500
    ds.PresentationLUTShape = "INVERSE"
    ds.QualityControlImage, ds.BurnedInAnnotation, ds.LossyImageCompression = "YES", "NO", "00"
    block = ds.private_block(0x0019, "HOLOGIC, Inc.", create=True)
    block.add_new(0x27, "SH", "Center")
    return ds


def build_case(case: str) -> Dataset:
    """The dataset of one case (see the module docstring)."""
    if case == "sends_monochrome1_14bit":
        return _sends()
    if case in ("seno_for_presentation", "seno_for_processing"):
        return _seno(case)
    if case == NO_PIXEL_CASE:
        return _hologic()
    raise ValueError(f"unknown DICOM case {case!r}; known: {', '.join(CASES)}")


def write_case(case: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    build_case(case).save_as(path, enforce_file_format=True)
    return path


def write_cases(folder: Path) -> dict[str, Path]:
    """Write the four cases as ``<folder>/<case>.dcm``; return case -> path."""
    return {case: write_case(case, folder / f"{case}.dcm") for case in CASES}
