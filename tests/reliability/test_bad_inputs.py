"""The bad-input corpus (tests/data/bad/generate.py): each broken input gets its exact, asserted behaviour.

Every item is either quarantined with its reason while the rest of the dataset goes on, or refused with
an error that names the item (file, row, entry, key) while nothing else is touched. The phantom items
(images, masks, CSV paths) are all injected into ONE phantom and curated once with the library call the
curate stage makes (``mammo_core.data.curation.curate``, process pool included), next to a curation of the
untouched twin: every image and lesion that was not injected must come out unchanged (lost == 0).

``run_corpus`` only observes (what was raised, what was written); the expectations live in ``CHECKS``,
one function per item, used by the per-item tests and by the summary in tests/reliability/test_reliability.py.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mammo_core import config
from mammo_core.data import curation
from mammo_core.data.cbis_tables import CsvSchemaError
from mammo_core.errors import BadItem, ParamsError
from mammo_core.models.fused import FusedDenseNet
from mammo_core.sources.safe_zip import extract_zip_safely
from mammo_core.storage import h5io
from mammo_core.storage.store import ArtifactStore, IntegrityError
from mammo_core.training import checkpoint
from tests.helpers.paths import REPO

GENERATOR = REPO / "tests" / "data" / "bad" / "generate.py"
SETTINGS = curation.CurationSettings(max_side=128, val_fraction=0.2, split_seed=0, workers=2, min_box_area=4)


def load_generator():
    spec = importlib.util.spec_from_file_location("bad_corpus_generate", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


GEN = load_generator()


@dataclass
class Attempt:
    """What happened when one stand-alone bad input was handed to the code that reads it."""

    error: BaseException | None
    effects: dict = field(default_factory=dict)


@dataclass
class CorpusOutcome:
    base: Path
    items: dict[str, object]  # name -> generate.Injected
    clean: curation.CurationResult
    curated: curation.CurationResult
    attempts: dict[str, Attempt]
    lost_images: set[str]
    lost_lesions: set[str]

    @property
    def lost(self) -> int:
        return len(self.lost_images) + len(self.lost_lesions)


def _attempt(fn: Callable[[], object]) -> BaseException | None:
    try:
        fn()
    except Exception as exc:  # the observation; CHECKS says which type and message are right
        return exc
    return None


def _csv_lesions(result: curation.CurationResult, item: str) -> set[str]:
    """Lesion ids of the clean curation that came from ``<csv file>:row <n>``."""
    name, _, row = item.partition(":row ")
    les = result.lesions
    return set(les.loc[(les["source_file"] == name) & (les["source_row"] == int(row)), "lesion_id"])


def _stand_alone(out: Path, base: Path, items: dict) -> dict[str, Attempt]:
    attempts: dict[str, Attempt] = {}
    for name in ("csv_missing_column", "csv_renamed_column"):
        root = (out / items[name].path).parent
        cache = base / f"{name}-cache"
        attempts[name] = Attempt(_attempt(lambda r=root, c=cache: curation.curate(r, "classic", c, SETTINGS)),
                                 {"cache_written": cache.exists() and any(cache.rglob("*"))})
    for name in ("zip_entry_dotdot", "zip_entry_absolute"):
        dest = base / "unzipped" / name
        archive = out / items[name].path
        before = archive.read_bytes()
        error = _attempt(lambda a=archive, d=dest: extract_zip_safely(a, d))
        escaped = (dest.parent / "escaped-by-zip.txt", Path("/tmp/escaped-by-zip-absolute.txt"))
        attempts[name] = Attempt(error, {"dest_exists": dest.exists(),
                                         "leftovers": sorted(p.name for p in dest.parent.iterdir()),
                                         "escaped": [str(p) for p in escaped if p.exists()],
                                         "archive_unchanged": archive.read_bytes() == before})
    for name in ("h5_truncated", "h5_overwritten_header"):
        path = out / items[name].path
        attempts[name] = Attempt(_attempt(lambda p=path: h5io.read_datasets(p)),
                                 {"good_still_reads": len(h5io.read_datasets(path.parent / "good.h5")["x"])})
    sealed = out / items["h5_corrupted_in_sealed_stage"].path
    store = ArtifactStore(sealed.parents[3])
    folder = store.find("patches", sealed.parent.name)
    notes = folder.path / "notes.txt"
    notes_entry = next(e for e in folder.manifest["files"] if e["path"] == "notes.txt")
    attempts["h5_corrupted_in_sealed_stage"] = Attempt(
        _attempt(lambda: store.verify(folder)),
        {"neighbour_intact": notes.read_text() == "kept\n" and notes.stat().st_size == notes_entry["size"],
         "still_sealed": store.find("patches", sealed.parent.name) is not None})

    other = out / items["checkpoint_other_architecture"].path
    expected = FusedDenseNet(GEN.EXPECTED_CLASSES, seed=0).state_dict()
    attempts["checkpoint_other_architecture"] = Attempt(_attempt(
        lambda: checkpoint.check_same_architecture(other, checkpoint.load_safely(other)["model"], expected)),
        {"file_kept": other.is_file()})
    payload = out / items["checkpoint_pickle_payload"].path
    marker = out / "files" / "PAYLOAD_RAN"
    attempts["checkpoint_pickle_payload"] = Attempt(_attempt(lambda: checkpoint.load_safely(payload)), {})
    attempts["checkpoint_pickle_payload"].effects["payload_ran"] = marker.exists()

    typo = out / items["params_typo_key"].path
    attempts["params_typo_key"] = Attempt(_attempt(lambda: config.load_params(typo)), {})
    return attempts


def run_corpus(base: Path) -> CorpusOutcome:
    """Generate the corpus under ``base``, feed every item to its reader, and record what happened."""
    out = base / "corpus"
    items = {i.name: i for i in GEN.generate(out)}
    assert json.loads((out / "corpus.json").read_text())[0]["name"] == next(iter(items))
    clean = curation.curate(out / "clean", "classic", base / "clean-cache", SETTINGS)
    assert clean.quarantine.empty, clean.quarantine
    curated = curation.curate(out / "phantom", "classic", base / "cache", SETTINGS)

    bad_images = {i.item for i in items.values() if i.target == "image"}
    gone_lesions = {i.item for i in items.values() if i.target == "lesion" and i.name != "mask_half_size_same_aspect"}
    for i in items.values():
        if i.target == "csv_row":
            gone_lesions |= _csv_lesions(clean, i.item)
    gone_lesions |= set(clean.lesions.loc[clean.lesions["image_id"].isin(bad_images), "lesion_id"])
    expected_images = set(clean.images["image_id"]) - bad_images
    expected_lesions = set(clean.lesions["lesion_id"]) - gone_lesions
    return CorpusOutcome(
        base=out,
        items=items,
        clean=clean,
        curated=curated,
        attempts=_stand_alone(out, base, items),
        lost_images=expected_images - set(curated.images["image_id"]),
        lost_lesions=expected_lesions - set(curated.lesions["lesion_id"]),
    )


# ------------------------------------------------------------------------------------------ expectations


def _quarantined(o: CorpusOutcome, name: str) -> tuple[str, str]:
    item = o.items[name]
    q = o.curated.quarantine
    rows = q[(q["item"] == item.item) & (q["kind"] == item.target)]
    assert len(rows) == 1, f"{name}: expected one {item.target} quarantine row for {item.item}, got\n{q}"
    return item.item, rows["reason"].iloc[0]


def _image_quarantined(reason_check: Callable[[str], bool]) -> Callable[[CorpusOutcome, str], None]:
    def check(o: CorpusOutcome, name: str) -> None:
        image_id, reason = _quarantined(o, name)
        assert reason_check(reason), f"{name}: reason {reason!r}"
        assert image_id not in set(o.curated.images["image_id"])
        assert image_id not in set(o.curated.lesions["image_id"])
    return check


def _lesion_quarantined(reason_check: Callable[[str], bool]) -> Callable[[CorpusOutcome, str], None]:
    def check(o: CorpusOutcome, name: str) -> None:
        lesion_id, reason = _quarantined(o, name)
        assert reason_check(reason), f"{name}: reason {reason!r}"
        assert lesion_id not in set(o.curated.lesions["lesion_id"])
        image_id = o.clean.lesions.set_index("lesion_id").loc[lesion_id, "image_id"]
        assert image_id in set(o.curated.images["image_id"]), "the image of a bad mask is kept"
    return check


def _csv_row_quarantined(fragment: str) -> Callable[[CorpusOutcome, str], None]:
    def check(o: CorpusOutcome, name: str) -> None:
        item, reason = _quarantined(o, name)
        assert fragment in reason, f"{name}: reason {reason!r}"
        lesions = _csv_lesions(o.clean, item)
        assert len(lesions) == 1 and not lesions & set(o.curated.lesions["lesion_id"])
    return check


def _half_size_mask_is_mapped(o: CorpusOutcome, name: str) -> None:
    lesion_id = o.items[name].item
    assert lesion_id not in set(o.curated.quarantine["item"])
    got = o.curated.lesions.set_index("lesion_id").loc[lesion_id, ["x0", "y0", "x1", "y1"]].to_numpy()
    ref = o.clean.lesions.set_index("lesion_id").loc[lesion_id, ["x0", "y0", "x1", "y1"]].to_numpy()
    assert abs(got - ref).max() <= 2, (got, ref)  # the half-size mask doubled back onto the image


def _csv_schema_error(column: str) -> Callable[[CorpusOutcome, str], None]:
    def check(o: CorpusOutcome, name: str) -> None:
        a = o.attempts[name]
        assert isinstance(a.error, CsvSchemaError), repr(a.error)
        prefix = f"{Path(o.items[name].path).name}: missing required column(s): {column} (found: "
        assert str(a.error).startswith(prefix), str(a.error)
        assert a.effects["cache_written"] is False, "a bad table stops curation before anything is written"
    return check


def _zip_refused(o: CorpusOutcome, name: str) -> None:
    a = o.attempts[name]
    assert isinstance(a.error, BadItem), repr(a.error)
    assert a.error.item == o.items[name].item, a.error.item
    assert Path(o.items[name].path).name in a.error.reason
    assert a.effects == {"dest_exists": False, "leftovers": [], "escaped": [], "archive_unchanged": True}


def _h5_unreadable(o: CorpusOutcome, name: str) -> None:
    a = o.attempts[name]
    assert isinstance(a.error, h5io.UnreadableH5Error), repr(a.error)
    assert str(o.base / o.items[name].path) in str(a.error)
    assert a.effects["good_still_reads"] == 16


def _sealed_h5_caught(o: CorpusOutcome, name: str) -> None:
    a = o.attempts[name]
    assert isinstance(a.error, IntegrityError), repr(a.error)
    assert "patches.h5 does not match its manifest" in str(a.error)
    assert a.effects == {"neighbour_intact": True, "still_sealed": True}


def _other_architecture(o: CorpusOutcome, name: str) -> None:
    a = o.attempts[name]
    assert isinstance(a.error, ValueError), repr(a.error)
    message = str(a.error)
    assert message.startswith(str(o.base / o.items[name].path)), message
    assert "checkpoint of another architecture; first mismatched key 'heads." in message, message
    assert f"has shape ({GEN.CHECKPOINT_CLASSES}," in message and a.effects["file_kept"]


def _pickle_refused(o: CorpusOutcome, name: str) -> None:
    a = o.attempts[name]
    assert isinstance(a.error, ValueError) and "refused" in str(a.error), repr(a.error)
    assert str(o.base / o.items[name].path) in str(a.error)
    assert a.effects["payload_ran"] is False


def _params_typo(o: CorpusOutcome, name: str) -> None:
    a = o.attempts[name]
    assert isinstance(a.error, ParamsError), repr(a.error)
    assert str(a.error) == f"{o.base / o.items[name].path}: curate.max_sid: unknown key", str(a.error)


CHECKS: dict[str, Callable[[CorpusOutcome, str], None]] = {
    "truncated_dicom": _image_quarantined(lambda r: r == "truncated DICOM"),
    "dicom_wrong_pixel_length": _image_quarantined(
        lambda r: r.startswith("pixel data length does not match Rows x Columns") and "expected" in r),
    "dicom_without_pixel_data": _image_quarantined(lambda r: r == "no pixel data"),
    "not_dicom_named_dcm": _image_quarantined(lambda r: r == "not a DICOM file"),
    "nan_pixels": _image_quarantined(lambda r: r == "non-finite pixel values"),
    "infinite_pixels": _image_quarantined(lambda r: r == "non-finite pixel values"),
    "mask_wrong_aspect": _lesion_quarantined(lambda r: r == "mask size 256x240 does not match image 256x160 and "
                                                          "aspect differs"),
    "mask_half_size_same_aspect": _half_size_mask_is_mapped,
    "empty_mask": _lesion_quarantined(lambda r: r == "mask is empty"),
    "csv_path_dotdot": _csv_row_quarantined("path escapes the data root"),
    "csv_path_absolute": _csv_row_quarantined("absolute path in CSV cell"),
    "csv_missing_column": _csv_schema_error("pathology"),
    "csv_renamed_column": _csv_schema_error("image view"),
    "zip_entry_dotdot": _zip_refused,
    "zip_entry_absolute": _zip_refused,
    "h5_truncated": _h5_unreadable,
    "h5_overwritten_header": _h5_unreadable,
    "h5_corrupted_in_sealed_stage": _sealed_h5_caught,
    "checkpoint_other_architecture": _other_architecture,
    "checkpoint_pickle_payload": _pickle_refused,
    "params_typo_key": _params_typo,
}


def verdicts(o: CorpusOutcome) -> dict[str, str | None]:
    """name -> None when the item behaved as specified, else the failed assertion's text."""
    out: dict[str, str | None] = {}
    for name in o.items:
        try:
            CHECKS[name](o, name)
            out[name] = None
        except AssertionError as exc:
            out[name] = str(exc) or "assertion failed"
    return out


# ----------------------------------------------------------------------------------------------- tests


def test_generator_is_deterministic_and_covers_the_issue_list(bad_input_outcome, tmp_path):
    assert set(bad_input_outcome.items) == set(CHECKS)
    issue_list = {
        "truncated DICOM", "DICOM with wrong pixel length", "DICOM without pixel data",
        "non-DICOM file with .dcm name", "mask of wrong size or aspect", "empty mask", "CSV with missing columns",
        "CSV with renamed columns", "CSV path escaping the data root (../)",
        "CSV path escaping the data root (absolute)", "zip with an entry escaping its folder", "NaN pixels",
        "infinite pixels", "a corrupted HDF5 file", "a checkpoint from another architecture",
        "a params file with a typo'd key",
    }
    assert issue_list <= {i.issue for i in bad_input_outcome.items.values()}
    # same arguments, same bytes: regenerate the phantom part and compare the injected files
    again = GEN.inject_phantom(tmp_path)
    first = {i.name: i for i in bad_input_outcome.items.values() if i.target != "file"}
    assert {i.name: i for i in again} == first
    for item in again:
        assert (tmp_path / item.path).read_bytes() == (bad_input_outcome.base / item.path).read_bytes(), item.name


@pytest.mark.parametrize("name", list(CHECKS))
def test_bad_input_behaves_as_specified(bad_input_outcome, name):
    CHECKS[name](bad_input_outcome, name)


def test_quarantine_holds_exactly_the_injected_items(bad_input_outcome):
    o = bad_input_outcome
    expected = {(i.target, i.item) for i in o.items.values()
                if i.target in ("image", "lesion", "csv_row") and i.name != "mask_half_size_same_aspect"}
    assert set(zip(o.curated.quarantine["kind"], o.curated.quarantine["item"], strict=True)) == expected
    assert o.curated.report["quarantined"] == len(expected)


def test_nothing_else_is_lost(bad_input_outcome):
    o = bad_input_outcome
    assert o.lost_images == set() and o.lost_lesions == set() and o.lost == 0
    # survivors are unchanged, not merely present: same boxes, same split (the half-size mask aside)
    half = o.items["mask_half_size_same_aspect"].item
    clean = o.clean.lesions.set_index("lesion_id")
    for lesion in o.curated.lesions.itertuples():
        if lesion.lesion_id != half:
            assert [list(b) for b in lesion.boxes] == [list(b) for b in clean.loc[lesion.lesion_id, "boxes"]]
    split = dict(zip(o.clean.images["image_id"], o.clean.images["split"], strict=True))
    assert all(split[i] == s for i, s in zip(o.curated.images["image_id"], o.curated.images["split"], strict=True))


def test_corpus_zips_hold_a_good_entry_too(bad_input_outcome):
    """The refusal is about the bad entry, not an unreadable archive: the good entry is there to extract."""
    for name in ("zip_entry_dotdot", "zip_entry_absolute"):
        with zipfile.ZipFile(bad_input_outcome.base / bad_input_outcome.items[name].path) as z:
            assert len(z.namelist()) == 2
