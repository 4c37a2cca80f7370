"""Similar-case search: exact matches, k, stable ties, box cropping as the patches stage cuts, bad input,
no patient id in results, the stage-folder loader and the ``mammo similar`` command on a built store."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from mammo_core.codes.similar import SimilarCaseIndex, parse_box, pathology_of, patient_free_id, read_query_image
from mammo_core.data import patches
from mammo_core.models.fused import FusedDenseNet
from mammo_core.models.hashing import HashDecoder
from mammo_core.sources.phantom import _dicom_bytes

SIZE = 32
BITS = 48
CLASSES = ["NORMAL", "MASS_BENIGN", "MASS_MALIGNANT"]
WEIGHTS = (0.4, 0.4, 0.2)
SETTINGS = patches.PatchSettings(size=SIZE, context=0.25, min_size_px=32)
N_DB = 10


def _smooth_patches(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((n, 1, 4, 4), dtype=np.float32))
    up = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return np.clip(up[:, 0].numpy() * 255, 0, 255).astype(np.uint8)


def _index(model, decoder, codes, ids, labels) -> SimilarCaseIndex:
    return SimilarCaseIndex(model, WEIGHTS, decoder, codes, ids, labels, CLASSES, SETTINGS)


@pytest.fixture(scope="module")
def built():
    """An untrained model, a decoder whose codes differ between patches, and the codes of N_DB patches."""
    torch.manual_seed(0)
    model = FusedDenseNet(len(CLASSES), seed=0).eval()
    decoder = HashDecoder(512, BITS, seed=0)
    with torch.no_grad():
        decoder.slice_weight.normal_(0.0, 1.0)  # spread the untrained codes away from the 0.5 threshold
    db_patches = _smooth_patches(N_DB, seed=1)
    probe = _index(model, decoder, np.zeros((1, BITS // 8), np.uint8), ["x"], [0])
    decoder.fit_input_scaling(probe.fused_features(db_patches))
    codes = probe.encode(db_patches)
    assert len({c.tobytes() for c in codes}) == N_DB, "test setup: database codes must be distinct"
    ids = [f"P_{i:05d}_LEFT_CC_MASS_1" if i % 2 else f"P_{i:05d}_LEFT_CC#normal0" for i in range(N_DB)]
    patient_ids = [f"P_{i:05d}" for i in range(N_DB)]
    labels = [1 + i % 2 if i % 2 else 0 for i in range(N_DB)]
    index = _index(model, decoder, codes, [patient_free_id(s, p) for s, p in zip(ids, patient_ids, strict=True)],
                   labels)
    return {"model": model, "decoder": decoder, "patches": db_patches, "codes": codes, "index": index,
            "ids": ids, "patient_ids": patient_ids, "labels": labels}


def test_exact_database_patch_returns_itself_first_at_distance_zero(built):
    index = built["index"]
    for row in (0, 3, 7):
        results = index.query(built["patches"][row], k=3)
        assert results[0]["row"] == row
        assert results[0]["distance"] == 0
        assert results[0]["rank"] == 1
        assert results[1]["distance"] > 0
        assert [r["distance"] for r in results] == sorted(r["distance"] for r in results)
    first = index.query(built["patches"][3], k=1)[0]
    assert first["source_id"] == "LEFT_CC_MASS_1"
    assert first["class_name"] == CLASSES[built["labels"][3]]
    assert first["pathology"] == pathology_of(first["class_name"]) != None  # noqa: E711


def test_uint16_patch_query_matches_the_8bit_patch(built):
    patch = built["patches"][4]
    assert built["index"].query(patch.astype(np.uint16) * 257, k=1)[0] == built["index"].query(patch, k=1)[0]


def test_k_is_respected_and_capped_by_the_database(built):
    index, patch = built["index"], built["patches"][2]
    assert len(index.query(patch, k=4)) == 4
    assert [r["rank"] for r in index.query(patch, k=4)] == [1, 2, 3, 4]
    assert len(index.query(patch, k=100)) == N_DB
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.query(patch, k=0)


def test_ties_keep_database_order(built):
    codes = built["codes"]
    q = 5
    other = codes[(q + 1) % N_DB]
    flipped = codes[q].copy()
    flipped[0] ^= 0b1000_0000  # one bit away from the query's code
    db = np.stack([other, flipped, codes[q], flipped, codes[q], codes[q]])
    index = _index(built["model"], built["decoder"], db, [f"case{i}" for i in range(6)], [0] * 6)
    results = index.query(built["patches"][q], k=5)
    assert [(r["row"], r["distance"]) for r in results] == [(2, 0), (4, 0), (5, 0), (1, 1), (3, 1)]
    assert index.query(built["patches"][q], k=5) == results  # and the same again


def _full_image(seed: int = 3) -> np.ndarray:
    """A 16-bit 'mammogram': a bright half-disc of tissue on black, a denser blob as the lesion."""
    rng = np.random.default_rng(seed)
    h, w = 200, 150
    yy, xx = np.mgrid[0:h, 0:w]
    breast = ((yy - h / 2) ** 2 / (0.45 * h) ** 2 + xx ** 2 / (0.9 * w) ** 2) <= 1
    image = np.where(breast, 20000 + rng.normal(0, 1500, (h, w)), 300.0)
    image += 15000 * np.exp(-((yy - 90) ** 2 + (xx - 60) ** 2) / (2 * 6.0 ** 2))
    return np.clip(image, 0, 65535).astype(np.uint16)


def test_box_query_cuts_exactly_like_the_patches_stage(tmp_path, built):
    image = _full_image()
    png = tmp_path / "cache.png"
    Image.fromarray(image).save(png)
    box = (50, 80, 71, 101)
    job = patches._ImageJob(
        image_id="img", split="train", patient_id="p", cache_file=str(png), cache_shape=image.shape,
        lesions=(patches._LesionCrop("les", 1, patches.lesion_crop_box(box, SETTINGS.context, SETTINGS.min_size_px)),),
        forbidden=(), normal_sides=(32,), n_normals=0, settings=SETTINGS,
    )
    stored = patches.process_image(job).pixels[0]
    queried = read_query_image(png)
    np.testing.assert_array_equal(built["index"].query_patch(queried, box), stored)
    edge = (0, 185, 12, 200)  # a crop centred on it would leave the image: the one crop policy shifts it inside
    edge_job = replace(job, lesions=(patches._LesionCrop("edge", 1, patches.lesion_crop_box(
        edge, SETTINGS.context, SETTINGS.min_size_px)),))
    edge_stored = patches.process_image(edge_job)
    assert edge_stored.boxes == [(0, 168, 32, 200)] and edge_stored.padded == [0.0]
    np.testing.assert_array_equal(built["index"].query_patch(queried, edge), edge_stored.pixels[0])
    # a database holding that patch finds it at distance 0
    index = built["index"]
    db = np.concatenate([built["codes"], index.encode(stored[None])])
    with_lesion = _index(built["model"], built["decoder"], db, [*index.case_ids, "the lesion"], [*index.labels, 2])
    top = with_lesion.query(queried, box=box, k=2)[0]
    assert (top["source_id"], top["distance"], top["row"]) == ("the lesion", 0, N_DB)


def test_box_at_a_smaller_cache_resolution_grows_the_minimum_crop(built):
    image = _full_image()
    tight = built["index"]
    half = SimilarCaseIndex(tight.model, WEIGHTS, tight.decoder, built["codes"], tight.case_ids, tight.labels,
                            CLASSES, SETTINGS, cache_max_side=100)  # the 200-px image was cached at half size
    box = (55, 85, 65, 95)
    assert not np.array_equal(tight.query_patch(image, box), half.query_patch(image, box))


@pytest.mark.parametrize(("image", "box", "message"), [
    (np.zeros((40, 40, 3), np.uint8), None, "3 channels"),
    (np.zeros((10, 40), np.uint8), None, "at least 16 pixels"),
    (np.zeros((40, 40), np.float32), None, "uint8 or uint16"),
    (np.zeros((100, 80), np.uint16), (70, 10, 90, 30), "outside the 80x100 image"),
    (np.zeros((100, 80), np.uint16), (-5, 10, 20, 30), "outside"),
    (np.zeros((100, 80), np.uint16), (30, 30, 30, 40), "empty"),
])
def test_bad_queries_are_clear_errors(built, image, box, message):
    with pytest.raises(ValueError, match=message):
        built["index"].query(image, box=box)


def test_empty_database_is_refused(built):
    with pytest.raises(ValueError, match="empty"):
        _index(built["model"], built["decoder"], np.zeros((0, BITS // 8), np.uint8), [], [])


def test_code_length_mismatch_is_refused(built):
    with pytest.raises(ValueError, match="48-bit"):
        _index(built["model"], built["decoder"], np.zeros((2, 3), np.uint8), ["a", "b"], [0, 0])


def _write_dicom(path: Path, modality: str) -> Path:
    pixels = _full_image()
    raw = _dicom_bytes(pixels, folder="Mass-Training_P_00001_LEFT_CC", patient="P_00001", study="1.2.3", series="1.2.4",
                       sop="1.2.5", side="LEFT", view="CC", description="full mammogram images", instance=1)
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.Modality = modality
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_of_another_modality_is_refused_by_name(tmp_path):
    ct = _write_dicom(tmp_path / "slice.dcm", "CT")
    with pytest.raises(ValueError, match=r"slice\.dcm: modality 'CT' is not a mammogram"):
        read_query_image(ct)
    image = read_query_image(_write_dicom(tmp_path / "mammo.dcm", "MG"))
    assert image.shape == (200, 150) and image.dtype == np.uint16


def test_results_carry_no_patient_id(built):
    index = built["index"]
    text = json.dumps([index.query(p, k=N_DB) for p in built["patches"][:3]])
    assert not any(pid in text for pid in built["patient_ids"])
    assert "patient" not in text
    assert set(index.query(built["patches"][0], k=1)[0]) == {"rank", "source_id", "class_name", "pathology",
                                                              "distance", "row"}


def test_small_helpers():
    assert patient_free_id("P_00003_RIGHT_CC_MASS_1", "P_00003") == "RIGHT_CC_MASS_1"
    assert patient_free_id("P_00003_RIGHT_CC#normal1", "P_00003") == "RIGHT_CC#normal1"
    assert pathology_of("MASS_BENIGN_WITHOUT_CALLBACK") == "BENIGN_WITHOUT_CALLBACK"
    assert pathology_of("CALC_MALIGNANT") == "MALIGNANT"
    assert pathology_of("NOT_MALIGNANT") is None and pathology_of("NORMAL") is None
    assert parse_box(" 1, 2,30,40 ") == (1, 2, 30, 40)
    with pytest.raises(ValueError, match="four numbers"):
        parse_box("1,2,3")


# -- stage folders and the command ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage_dirs(built, tmp_path_factory):
    """train/features/hashing folders laid out as the stages write them, for the built objects."""
    root = tmp_path_factory.mktemp("stages")
    train, feats, hashing = root / "train" / "trainkey0000", root / "features" / "featkey", root / "hashing" / "hk"
    for d in (train, feats, hashing / "decoders"):
        d.mkdir(parents=True)
    torch.save(built["model"].state_dict(), train / "weights.pt")
    (train / "model_config.json").write_text(json.dumps({"num_classes": len(CLASSES), "class_names": CLASSES,
                                                         "freeze_upto": built["model"].freeze_upto,
                                                         "patch_size": SIZE}))
    (feats / "fusion.json").write_text(json.dumps({"weights": list(WEIGHTS), "model_key": "trainkey0000"}))
    torch.save(built["decoder"].state_dict(), hashing / "decoders" / f"hash_{BITS}.pt")
    (hashing / "hashing.json").write_text(json.dumps({"bits": [BITS], "in_dim": 512, "beta": 1.0, "eps": 0.1,
                                                      "class_names": CLASSES}))
    with h5py.File(hashing / "codes.h5", "w") as fh:
        fh.attrs["class_names"] = json.dumps(CLASSES)
        fh.attrs["features_model_key"] = json.dumps("trainkey0000")
        fh.create_dataset(f"hash/{BITS}/train", data=built["codes"])
        fh.create_dataset("labels/train", data=np.asarray(built["labels"], dtype=np.int64))
        fh.create_dataset("patient_id/train", data=np.asarray(built["patient_ids"], dtype="S7"))
        fh.create_dataset("source_id/train", data=np.asarray(built["ids"], dtype="S25"))
    return {"train": train, "features": feats, "hashing": hashing}


def test_load_index_from_stage_folders(built, stage_dirs):
    from flows.commands.similar_cmd import load_index

    index = load_index(stage_dirs["train"], stage_dirs["features"], stage_dirs["hashing"], "hash", BITS)
    assert len(index) == N_DB and index.fusion_weights == WEIGHTS
    assert index.case_ids[1] == "LEFT_CC_MASS_1"
    top = index.query(built["patches"][6], k=1)[0]
    assert (top["row"], top["distance"]) == (6, 0)
    with pytest.raises(ValueError, match="no codes 'fc/48/train'"):
        load_index(stage_dirs["train"], stage_dirs["features"], stage_dirs["hashing"], "fc", BITS)


def test_load_index_refuses_features_of_another_model(stage_dirs, tmp_path):
    from flows.commands.similar_cmd import load_index

    other = tmp_path / "features"
    other.mkdir()
    (other / "fusion.json").write_text(json.dumps({"weights": list(WEIGHTS), "model_key": "someoneelse"}))
    with pytest.raises(ValueError, match="someoneelse.*trainkey0000"):
        load_index(stage_dirs["train"], other, stage_dirs["hashing"])


def test_similar_command_prints_json_and_table(built, stage_dirs, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from flows.commands import similar_cmd

    monkeypatch.setattr(similar_cmd, "stage_folders", lambda p, root: stage_dirs)
    monkeypatch.setattr(similar_cmd.environment, "configure", lambda root: None)
    app = typer.Typer()
    app.command("similar")(similar_cmd.similar)
    app.command("unused")(lambda: None)  # two commands: typer keeps "similar" as a sub-command name
    png = tmp_path / "P_00006_query.png"
    Image.fromarray(built["patches"][6]).save(png)
    smoke = Path(__file__).resolve().parents[3] / "params" / "smoke.yaml"
    base = ["similar", str(png), "-p", str(smoke), "--store", str(tmp_path / "store"), "--bits", str(BITS)]
    result = CliRunner().invoke(app, [*base, "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["rank"] for r in out["results"]] == [1, 2, 3]
    assert (out["results"][0]["row"], out["results"][0]["distance"]) == (6, 0)
    assert "P_0000" not in result.stdout
    table = CliRunner().invoke(app, [*base, "-k", "2"])
    assert table.exit_code == 0 and "LEFT_CC#normal0" in table.stdout and "P_0000" not in table.stdout
    bad = CliRunner().invoke(app, [*base, "--box", "1,2,3"])
    assert bad.exit_code == 2
    outside = CliRunner().invoke(app, [*base, "--box", "0,0,500,500"])
    assert outside.exit_code == 1 and "outside" in outside.output
