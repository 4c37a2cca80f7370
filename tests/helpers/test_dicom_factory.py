"""The generated vendor-equivalent DICOMs (tests.helpers.dicom_factory): deterministic, faithful to the real files
on everything the reader reports, and free of the real files' identifying values."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from mammo_core.data.dicom_io import read_dicom_header, read_dicom_image
from mammo_core.errors import BadItem
from tests.helpers.dicom_factory import CASES, NO_PIXEL_CASE, PIXELS, build_case, write_cases
from tests.helpers.fixture_files import requires_vendor_dicoms, vendor_dicom_files

# identifying values of the generated files (tests/reliability/test_phi.py searches the store for each)
PERSONAL = ("Radiografía^Thửnghiệm", "SYNT4821", "东区医院", "Новосибирск", "Synthetic^MGCases",
            "7305912846150273", "Physique^FantômeRotatif", "phy24680FantRot", "Jones^Annette")


def _reader_view(path) -> dict:
    """What leaves the reader for one file: its header, and its image and metadata or its rejection."""
    view = {"header": read_dicom_header(path)}
    try:
        image, meta = read_dicom_image(path)
        view.update(image=image.tolist(), meta=meta)
    except BadItem as exc:
        view["rejected"] = exc.reason
    return view


def test_files_are_deterministic(tmp_path):
    first, second = write_cases(tmp_path / "a"), write_cases(tmp_path / "b")
    for case in CASES:
        assert first[case].read_bytes() == second[case].read_bytes(), case


def test_generated_cases_have_the_listed_properties(tmp_path):
    files = write_cases(tmp_path)
    datasets = {case: pydicom.dcmread(path) for case, path in files.items()}
    sends, present, process, hologic = (datasets[c] for c in CASES)
    assert (sends.PhotometricInterpretation, sends.BitsStored, sends.PresentationIntentType) == \
        ("MONOCHROME1", 14, "FOR PROCESSING")
    assert sends.pixel_array.shape == (4, 4) and "WindowCenter" not in sends
    assert (present.PhotometricInterpretation, present.BitsStored, present.VOILUTFunction) == \
        ("MONOCHROME2", 12, "SIGMOID")
    assert len(present.WindowCenter) == len(present.WindowWidth) == len(present.VOILUTSequence) == 3
    assert (process.PhotometricInterpretation, process.BitsStored, process.PresentationIntentType) == \
        ("MONOCHROME1", 11, "FOR PROCESSING")
    assert hologic.Modality == "MG" and "PixelData" not in hologic and CASES[3] == NO_PIXEL_CASE
    for case in CASES[:3]:
        ds = datasets[case]
        assert ds.pixel_array.tolist() == PIXELS[case]
        assert "PixelData" in ds.IconImageSequence[0]  # nested pixels the reader must ignore
    for ds in datasets.values():
        assert str(ds.PatientName) and ds.PatientID and ds.InstitutionName
    assert sends.SpecificCharacterSet == "ISO_IR 192" and hologic.SpecificCharacterSet == "ISO_IR 100"


@requires_vendor_dicoms
@pytest.mark.parametrize("case", CASES)
def test_reader_sees_the_generated_file_as_it_sees_the_vendor_file(tmp_path, case):
    vendor = vendor_dicom_files()[case]
    generated = tmp_path / f"{case}.dcm"
    build_case(case).save_as(generated, enforce_file_format=True)
    ours, theirs = _reader_view(generated), _reader_view(vendor)
    assert ours == theirs
    if case != NO_PIXEL_CASE:
        assert np.array_equal(pydicom.dcmread(generated).pixel_array, pydicom.dcmread(vendor).pixel_array)


@requires_vendor_dicoms
def test_no_identifying_value_is_copied_from_the_vendor_files(tmp_path):
    vendor = vendor_dicom_files()
    generated = b"".join(p.read_bytes() for p in write_cases(tmp_path).values())
    for case, path in vendor.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "AccessionNumber", "InstitutionName", "StationName",
                        "DeviceSerialNumber", "DetectorID", "OperatorsName", "StudyInstanceUID", "SOPInstanceUID"):
            value = str(ds.get(keyword) or "")
            if len(value) >= 4:
                assert value.encode("utf-8") not in generated, (case, keyword)
    for value in PERSONAL:  # and the generated files do carry their own
        assert value.encode("utf-8") in generated or value.encode("latin-1", "ignore") in generated, value
