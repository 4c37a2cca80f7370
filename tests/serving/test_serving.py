"""The served classifier: registered from a finished smoke run, loaded back through ``mlflow.pyfunc``.

The module fixture runs ``mammo run -p params/smoke.yaml`` once into a temporary store (as
test_pipeline_e2e does). When the classify stage already registered ``mammo-classifier`` that version is
tested; otherwise the fixture calls :func:`tasks.serving.classifier.log_and_register` itself on the store's classify
output, with a stage context like the one classify gets. Setting ``MAMMO_SERVING_SMOKE_STORE`` to a
finished smoke store skips the pipeline run (the store is only read; models go to a temporary tracking DB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from mammo_core.codes import features, model_io, retrieval
from mammo_core.inference.served_inputs import REFUSED_PATH, ServeLimits
from mammo_core.storage.store import ArtifactStore
from mammo_core.training.loop import prepare_images
from tasks import runtime, tracking
from tasks.serving import classifier as serving
from tasks.stages.hashing import load_decoder
from tasks.stages.train import load_trained

pytestmark = pytest.mark.slow
N_PATCHES = 6


def _is_registered(client: MlflowClient) -> bool:
    return any(m.name == serving.REGISTERED_NAME for m in client.search_registered_models())


def _register_like_classify(store: Path, classify, client: MlflowClient, workdir: Path) -> None:
    """What classify's ``_run`` does at its end, on a copy of its (sealed) folder."""
    shutil.copytree(classify.path, workdir)
    experiment = tracking.ensure_experiment(client, "mammo-fusion", store / "mlartifacts")
    run_id = tracking.start_run(client, experiment, "classify", tags={"stage": "classify"})

    def result(stage: str) -> runtime.StageResult:
        key = classify.manifest["upstream"][stage]
        return runtime.StageResult(stage, key, str(store / "stages" / stage / key), {}, None, None, 0.0, False)

    ctx = runtime.StageContext(stage="classify", key=classify.key, workdir=workdir, params=None,
                               upstream={"train": result("train"), "hashing": result("hashing")}, store_root=store,
                               client=client, run_id=run_id, logger=logging.getLogger("test_serving"))
    serving.log_and_register(ctx)
    tracking.finish_run(client, run_id, ok=True)


@pytest.fixture(scope="module")
def served(smoke_store, tmp_path_factory):
    """(store, tracking URI, classify StageFolder, store reused?); the global tracking URI points there meanwhile.

    The store is a copy of the session's smoke run (conftest), which registered the model through the
    classify stage.
    """
    from tests.helpers.smoke_store import copy_store

    tmp = tmp_path_factory.mktemp("serving")
    given = os.environ.get("MAMMO_SERVING_SMOKE_STORE")
    if given:
        store, tracking_uri = Path(given).resolve(), f"sqlite:///{tmp / 'mlflow.db'}"
    else:
        store = copy_store(smoke_store, tmp / "store")
        tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    art = ArtifactStore(store)
    (classify_dir,) = [p for p in art.stage_dir("classify").iterdir() if (p / "manifest.json").is_file()]
    classify = art.find("classify", classify_dir.name)
    client = MlflowClient(tracking_uri)
    if not _is_registered(client):
        _register_like_classify(store, classify, client, tmp / "classify_copy")
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    yield store, tracking_uri, classify, bool(given)
    mlflow.set_tracking_uri(None)
    if env_before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = env_before


@pytest.fixture(scope="module")
def model(served):
    return mlflow.pyfunc.load_model(f"models:/{serving.REGISTERED_NAME}/latest")


@pytest.fixture(scope="module")
def lineage(served) -> dict[str, Path]:
    store, _, classify, _ = served
    art = ArtifactStore(store)
    train = art.find("train", classify.manifest["upstream"]["train"])
    hashing = art.find("hashing", classify.manifest["upstream"]["hashing"])
    return {"classify": classify.path, "train": train.path, "hashing": hashing.path,
            "features": art.find("features", hashing.manifest["upstream"]["features"]).path,
            "patches": art.find("patches", train.manifest["upstream"]["patches"]).path}


@pytest.fixture(scope="module")
def test_patches(lineage) -> np.ndarray:
    """The first test-split patches of patches.h5, uint8 (N, S, S): rows 0..N-1 of codes.h5's test codes."""
    with h5py.File(lineage["patches"] / "patches.h5", "r") as fh:
        rows = np.flatnonzero(fh["split"][:] == 2)[:N_PATCHES]
        return fh["images"][rows][:, 0]


def _class_names(lineage) -> list[str]:
    return json.loads((lineage["classify"] / "classifier.json").read_text())["class_names"]


def _by_hand(lineage, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, fused probabilities) through the stages' own loaders, independently of tasks.serving.classifier."""
    classifier_cfg = json.loads((lineage["classify"] / "classifier.json").read_text())
    kind, bits = classifier_cfg["codes"].split("@")
    net, _ = load_trained(lineage["train"])
    weights = json.loads((lineage["features"] / "fusion.json").read_text())["weights"]
    with torch.inference_mode():
        feats = net.features(prepare_images(torch.from_numpy(images[:, None]), "cpu"))
    fused = features.fuse({b: f.numpy() for b, f in feats.items()}, weights)
    codes = load_decoder(lineage["hashing"], kind, int(bits)).encode(fused)
    clf = model_io.load_model(lineage["classify"] / "fusion.skops", classifier_cfg["sha256"])
    return codes, clf.predict_proba(codes)


def test_the_classify_stage_logs_and_registers_the_model(served):
    store, tracking_uri, classify, reused_store = served
    if reused_store:
        pytest.skip("MAMMO_SERVING_SMOKE_STORE: the model was registered by the fixture, not by a pipeline run")
    client = MlflowClient(tracking_uri)
    (version,) = client.search_model_versions(f"name='{serving.REGISTERED_NAME}'")
    run = client.get_run(classify.mlflow_run_id)
    assert version.run_id == run.info.run_id
    assert run.data.tags["serving.registered_version"] == str(version.version)
    logged = client.get_logged_model(run.data.tags["serving.model_id"])
    assert logged.experiment_id == run.info.experiment_id and logged.source_run_id == run.info.run_id
    assert logged.artifact_location.startswith((store / "mlartifacts").as_uri())
    assert (classify.path / serving.PREPROCESSING_FILE).is_file()


def test_registered_model_returns_probabilities_per_class(model, lineage, test_patches):
    names = _class_names(lineage)
    out = model.predict(pd.DataFrame({"image": list(test_patches)}))
    assert list(out.columns) == [*names, serving.PREDICTED, serving.ERROR]
    proba = out[names].to_numpy()
    assert proba.shape == (N_PATCHES, len(names))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert (proba >= 0).all()
    assert list(out[serving.PREDICTED]) == [names[k] for k in proba.argmax(axis=1)]
    assert (out[serving.ERROR] == "").all()
    sig = model.metadata.signature
    assert [c.name for c in sig.inputs.inputs] == ["image", "path"]
    assert [c.name for c in sig.outputs.inputs][: len(names)] == names


def test_served_chain_equals_the_pipeline_by_hand(model, lineage, test_patches):
    codes, proba = _by_hand(lineage, test_patches)
    kind, bits = json.loads((lineage["classify"] / "classifier.json").read_text())["codes"].split("@")
    with h5py.File(lineage["hashing"] / "codes.h5", "r") as fh:  # what classify measured on these patches
        stored = retrieval.unpack_codes(fh[f"{kind}/{bits}/test"][:N_PATCHES], int(bits))
    np.testing.assert_array_equal(codes, stored)
    out = model.predict(pd.DataFrame({"image": [p.tolist() for p in test_patches]}))  # lists, as JSON gives
    np.testing.assert_allclose(out[_class_names(lineage)].to_numpy(), proba, rtol=0, atol=1e-12)
    assert np.array_equal(model.unwrap_python_model().pipeline.codes(test_patches), stored)


def _stretched(patch: np.ndarray) -> np.ndarray:
    """The patch spanning exactly 0..255, so its 16-bit version x257 maps back onto it exactly."""
    p = patch.astype(np.float64)
    return np.rint((p - p.min()) * 255.0 / (p.max() - p.min())).astype(np.uint8)


def _dicom(pixels: np.ndarray, path: Path) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "MG", "Doe^Jane", "SYNTH0001"
    ds.set_pixel_data(pixels, "MONOCHROME2", 16)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_files_and_16_bit_inputs_follow_the_patches_stage_mapping(model, lineage, test_patches, tmp_path):
    names = _class_names(lineage)
    p8 = _stretched(test_patches[0])
    p16 = p8.astype(np.uint16) * 257
    Image.fromarray(p8).save(tmp_path / "p8.png")
    Image.fromarray(p16).save(tmp_path / "p16.png")
    dcm = _dicom(p16, tmp_path / "p16.dcm")
    reference = model.predict(pd.DataFrame({"image": [p8]}))[names].to_numpy()
    pipeline = model.unwrap_python_model().pipeline
    by_array = pipeline.predict_frame(pd.DataFrame({"image": [p16]}))
    by_file = pipeline.predict_frame(pd.DataFrame({"path": ["p8.png", str(tmp_path / "p16.png"), str(dcm)]}),
                                     ServeLimits(root=tmp_path))
    np.testing.assert_allclose(by_array[names].to_numpy(), reference, atol=1e-12)
    np.testing.assert_allclose(by_file[names].to_numpy(), np.repeat(reference, 3, axis=0), atol=1e-12)
    assert "Doe" not in by_file.to_json() and "SYNTH0001" not in by_file.to_json()
    # a larger 8-bit crop is resized to the training patch size, not refused
    big = np.kron(test_patches[1], np.ones((2, 2), dtype=np.uint8))
    assert model.predict(pd.DataFrame({"image": [big]}))[serving.ERROR].iloc[0] == ""


def test_unusable_rows_get_a_reason_and_the_others_are_classified(model, lineage, test_patches, tmp_path):
    names = _class_names(lineage)
    missing = tmp_path / "Calc-Test_P_00038_LEFT_CC.png"  # CBIS-like name: a patient id
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    frame = pd.DataFrame({"path": [str(missing), str(not_image), None], "image": [None, None, test_patches[0]]})
    out = model.unwrap_python_model().pipeline.predict_frame(frame, ServeLimits(root=tmp_path))
    assert out[serving.ERROR].iloc[0] == REFUSED_PATH  # missing: the same answer as any refused path
    assert out[serving.ERROR].iloc[1].startswith("unsupported image format")
    assert out[serving.ERROR].iloc[2] == ""
    assert out[names].iloc[:2].isna().all().all() and list(out[serving.PREDICTED].iloc[:2]) == ["", ""]
    np.testing.assert_allclose(out[names].iloc[2].sum(), 1.0)
    assert "P_00038" not in out.to_json()
    bad = model.unwrap_python_model().pipeline.predict_frame(pd.DataFrame({"image": [np.zeros((4, 4, 3), np.uint8)]}))
    assert "2-D" in bad[serving.ERROR].iloc[0]
    with pytest.raises(ValueError, match="'image'"):
        model.predict(pd.DataFrame({"other": [1]}))


def test_a_tampered_skops_file_in_the_logged_model_is_refused(served, tmp_path):
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{serving.REGISTERED_NAME}/latest",
                                                     dst_path=str(tmp_path / "model")))
    folder = local / "data" / serving.DATA_FOLDER
    skops_file = folder / "fusion.skops"
    data = bytearray(skops_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    skops_file.write_bytes(bytes(data))
    # rewriting the digest next to it does not help: the expected digest is the MLmodel's
    classifier_json = folder / "classifier.json"
    cfg = json.loads(classifier_json.read_text())
    classifier_json.write_text(json.dumps({**cfg, "sha256": hashlib.sha256(data).hexdigest()}))
    with pytest.raises(model_io.ModelFileError, match=r"fusion\.skops: sha256 .* refusing to load"):
        mlflow.pyfunc.load_model(str(local))


@pytest.fixture
def cli(served, monkeypatch):
    """Invoke ``predict`` as a one-command Typer app; the process environment is restored afterwards."""
    import typer
    from typer.testing import CliRunner

    from flows.commands.predict_cmd import predict

    store, tracking_uri, _, _ = served
    saved = dict(os.environ)
    if tracking_uri != f"sqlite:///{store.resolve() / 'mlflow.db'}":  # the store's own DB is the default
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    else:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    app = typer.Typer()
    app.command()(predict)
    runner = CliRunner()
    yield lambda *args: runner.invoke(app, [*args, "--store", str(store)])
    os.environ.clear()
    os.environ.update(saved)
    mlflow.set_tracking_uri(tracking_uri)


def test_predict_command_prints_json_for_a_png_patch(cli, model, lineage, test_patches, tmp_path):
    names = _class_names(lineage)
    png = tmp_path / "Mass-Test_P_00016_LEFT_CC_patch.png"
    Image.fromarray(test_patches[0]).save(png)
    result = cli(str(png), str(tmp_path / "absent.png"), "--json")
    assert result.exit_code == 1, result.output  # one input failed; the other is still answered
    rows = json.loads(result.stdout)
    expected = model.predict(pd.DataFrame({"image": [test_patches[0]]}))
    assert [r["input"] for r in rows] == [1, 2]
    assert list(rows[0]["probabilities"]) == names
    np.testing.assert_allclose([rows[0]["probabilities"][c] for c in names], expected[names].iloc[0], atol=1e-12)
    assert rows[0]["predicted_class"] == expected[serving.PREDICTED].iloc[0]
    assert rows[1] == {"input": 2, "probabilities": None, "predicted_class": None, "error": "file not found"}
    assert "P_00016" not in result.stdout


def test_predict_command_names_missing_models_and_how_to_get_them(cli, served, tmp_path):
    """Last in this module: it removes the detector's registration from the module's store copy."""
    result = cli(str(tmp_path / "x.png"), "--model", "models:/no-such-model/1")
    assert result.exit_code == 2
    assert "no registered model 'no-such-model'" in result.output
    _, tracking_uri, _, given_store = served
    assert "mammo-classifier" in result.output  # the message lists what is registered
    client = MlflowClient(tracking_uri)
    if not given_store:  # the pipeline run registered the detector too
        assert "mammo-detector" in result.output
        client.delete_registered_model("mammo-detector")
    result = cli(str(tmp_path / "x.png"), "--model", "models:/mammo-detector/latest")
    assert result.exit_code == 2
    assert "no registered model 'mammo-detector'" in result.output and "detect stage" in result.output
