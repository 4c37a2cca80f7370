"""ChunkedH5Writer: background appends in order, chunked compressed datasets, atomic publication."""

from __future__ import annotations

import threading

import h5py
import numpy as np
import pytest

from mammo_core.storage import h5io
from mammo_core.storage.h5io import ChunkedH5Writer, DatasetSpec

SPECS = [
    DatasetSpec("x", np.uint16, (3, 4)),
    DatasetSpec("n", np.int64),
    DatasetSpec("name", "S8"),
]


def _batch(start: int, n: int) -> dict:
    idx = np.arange(start, start + n)
    return {
        "x": (idx[:, None, None] + np.zeros((1, 3, 4), dtype=np.int64)).astype(np.uint16),
        "n": idx,
        "name": [f"r{i}" for i in idx],
    }


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_rows_keep_append_order_across_many_batches(tmp_path):
    path = tmp_path / "out.h5"
    sizes = [1, 7, 3, 50, 2, 1, 13] * 6
    start = 0
    with ChunkedH5Writer(path, SPECS, queue_batches=2, chunk_rows=16) as writer:
        for n in sizes:
            writer.append(**_batch(start, n))
            start += n
    data = h5io.read_datasets(path)
    assert data["n"].tolist() == list(range(start))
    assert (data["x"][:, 2, 3] == np.arange(start)).all()
    assert h5io.decode_strings(data["name"][[0, 5, start - 1]]) == ["r0", "r5", f"r{start - 1}"]


def test_writes_happen_on_the_background_thread(tmp_path, monkeypatch):
    threads = set()
    real_setitem = h5py.Dataset.__setitem__

    def spy(self, key, value):
        threads.add(threading.current_thread().name)
        return real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", spy)
    with ChunkedH5Writer(tmp_path / "out.h5", SPECS) as writer:
        writer.append(**_batch(0, 5))
    assert threads == {"h5-writer-out.h5"}


def test_datasets_are_chunked_resizable_and_compressed(tmp_path):
    path = tmp_path / "out.h5"
    with ChunkedH5Writer(path, SPECS, compression="gzip", level=6) as writer:
        writer.append(**_batch(0, 10))
    with h5py.File(path) as fh:
        assert fh["x"].compression == "gzip" and fh["x"].compression_opts == 6
        assert fh["x"].chunks[1:] == (3, 4) and fh["x"].maxshape == (None, 3, 4)
        assert fh["n"].dtype == np.int64 and fh["name"].dtype == np.dtype("S8")
    lzf = tmp_path / "lzf.h5"
    with ChunkedH5Writer(lzf, SPECS, compression="lzf") as writer:
        writer.append(**_batch(0, 10))
    with h5py.File(lzf) as fh:
        assert fh["x"].compression == "lzf"


def test_attrs_are_json_round_tripped_and_settable_at_the_end(tmp_path):
    path = tmp_path / "out.h5"
    with ChunkedH5Writer(path, SPECS, attrs={"class_names": ["A", "B"], "size": 64}) as writer:
        writer.append(**_batch(0, 2))
        writer.set_attrs(counts={"train": {"A": 2}})
    assert h5io.read_attrs(path) == {"class_names": ["A", "B"], "size": 64, "counts": {"train": {"A": 2}}}


@pytest.mark.parametrize("key", ["PatientName", "patient_birth_date", "AccessionNumber", "institution_name",
                                 "PatientID", "patient_sex", "PatientAge", "OtherPatientIDs", "OperatorsName",
                                 "StationName", "StudyDate", "device_serial_number", "StudyID"])
def test_identifying_attribute_keys_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="patient identifier"):
        ChunkedH5Writer(tmp_path / "out.h5", SPECS, attrs={key: "x"})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("attrs", [
    {"source": {"Rows": 2, "PatientID": "x"}},  # a header dict passed along whole
    {"headers": [{"Modality": "MG"}, {"PatientSex": "F"}]},
    {"counts": {"train": {"patient_age": 1}}},
])
def test_identifying_keys_inside_values_are_refused(tmp_path, attrs):
    """The old filter looked at top-level names only: a dict of DICOM header values went through whole."""
    path = tmp_path / "out.h5"
    with pytest.raises(ValueError, match="patient identifier"):
        ChunkedH5Writer(path, SPECS, attrs=attrs)
    with ChunkedH5Writer(path, SPECS) as writer:
        writer.append(**_batch(0, 1))
        with pytest.raises(ValueError, match="patient identifier"):
            writer.set_attrs(**attrs)
    assert h5io.read_attrs(path) == {}


def test_what_may_leave_a_dicom_may_be_stored(tmp_path):
    """One allow-list: what dicom_io.safe_metadata lets out, an HDF5 attribute may hold (and nothing else)."""
    from mammo_core.data.dicom_io import ALLOWED_FIELDS, withheld_keyword

    assert [k for k in ALLOWED_FIELDS if withheld_keyword(k)] == []
    meta = {"Rows": 4, "BurnedInAnnotation": "NO", "Manufacturer": "GE", "PatientOrientation": ["A", "R"]}
    path = tmp_path / "out.h5"
    with ChunkedH5Writer(path, SPECS, attrs={"dicom": meta, "copies": 2, "crop": None}) as writer:
        writer.append(**_batch(0, 1))
    assert h5io.read_attrs(path) == {"dicom": meta, "copies": 2, "crop": None}


def test_non_json_attribute_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not JSON-able"):
        ChunkedH5Writer(tmp_path / "out.h5", SPECS, attrs={"when": object()})


def test_no_file_at_the_final_path_until_a_clean_close(tmp_path):
    path = tmp_path / "out.h5"
    with ChunkedH5Writer(path, SPECS) as writer:
        writer.append(**_batch(0, 3))
        assert not path.exists()
    assert path.exists() and _leftovers(tmp_path) == ["out.h5"]


def test_exception_inside_the_block_leaves_no_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.h5"
    with pytest.raises(RuntimeError, match="boom"), ChunkedH5Writer(path, SPECS, queue_batches=1) as writer:
        for i in range(20):
            writer.append(**_batch(i * 5, 5))
        raise RuntimeError("boom")
    assert _leftovers(tmp_path) == []


def test_failed_rewrite_keeps_the_previous_file(tmp_path):
    path = tmp_path / "out.h5"
    with ChunkedH5Writer(path, SPECS) as writer:
        writer.append(**_batch(0, 4))
    with pytest.raises(KeyError), ChunkedH5Writer(path, SPECS) as writer:
        writer.append(**_batch(100, 9))
        raise KeyError("stop")
    assert h5io.read_datasets(path, ["n"])["n"].tolist() == [0, 1, 2, 3]
    assert _leftovers(tmp_path) == ["out.h5"]


def test_bad_batches_are_refused_at_append(tmp_path):
    with pytest.raises(ValueError), ChunkedH5Writer(tmp_path / "out.h5", SPECS) as writer:
        bad = _batch(0, 3)
        bad["name"] = ["this-is-too-long", "a", "b"]
        writer.append(**bad)
    with pytest.raises(ValueError, match="different row counts"), ChunkedH5Writer(tmp_path / "o.h5", SPECS) as w:
        bad = _batch(0, 3)
        bad["n"] = np.arange(4)
        w.append(**bad)
    with pytest.raises(ValueError, match="missing"), ChunkedH5Writer(tmp_path / "o.h5", SPECS) as w:
        w.append(x=np.zeros((1, 3, 4)), n=[1])
    with pytest.raises(ValueError, match="range"), ChunkedH5Writer(tmp_path / "o.h5", SPECS) as w:
        bad = _batch(0, 1)
        bad["x"] = np.full((1, 3, 4), 70000)
        w.append(**bad)
    assert _leftovers(tmp_path) == []


def test_a_failure_in_the_writer_thread_reaches_the_producer(tmp_path, monkeypatch):
    def broken(self, key, value):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", broken)
    path = tmp_path / "out.h5"
    with pytest.raises(RuntimeError, match="disk full"), ChunkedH5Writer(path, SPECS, queue_batches=1) as writer:
        for i in range(50):
            writer.append(**_batch(i, 1))
    assert _leftovers(tmp_path) == []


def test_iter_blocks_covers_every_row_once(tmp_path):
    path = tmp_path / "out.h5"
    with ChunkedH5Writer(path, SPECS) as writer:
        writer.append(**_batch(0, 23))
    starts, rows = [], []
    for start, block in h5io.iter_blocks(path, ["n", "x"], 5):
        starts.append(start)
        rows.extend(block["n"].tolist())
    assert starts == [0, 5, 10, 15, 20] and rows == list(range(23))
    with pytest.raises(KeyError, match="no dataset"):
        h5io.read_datasets(path, ["nope"])


def test_string_dtype_fits_the_longest_utf8_value():
    assert h5io.string_dtype(["ab", "abcd"]) == np.dtype("S4")
    assert h5io.string_dtype(["é"]) == np.dtype("S2")
    assert h5io.string_dtype([]) == np.dtype("S1")
