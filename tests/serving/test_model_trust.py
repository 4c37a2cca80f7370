"""Untrusted models and served inputs: planted cases are refused with one line, before anything runs.

On a copy of the session's smoke store (its classify and detect stages registered mammo-classifier and
mammo-detector the way every run does):

- a cloudpickled pyfunc model whose unpickling creates a marker file, registered as the latest
  ``mammo-classifier`` (without and with forged digest tags), is refused by ``mammo predict`` and the
  marker file is never created; loading it with plain MLflow does create it (the plant is real);
- a changed file, an added file in the registered version's artifact folder are refused (digest check);
  put back, the version loads and classifies again (nothing else was lost);
- served ``path`` values are read only under the root given at serve time; every refused path gets the
  same message; arrays, images and requests are capped;
- ``mammo predict --about`` prints each model's card, every number equal to the stage artifacts'.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from mammo_core.inference.served_inputs import ENV_MAX_PIXELS, ENV_MAX_ROWS, ENV_ROOT, REFUSED_PATH, ServeLimits
from mammo_core.storage.store import ArtifactStore
from tasks.serving import classifier as serving
from tasks.serving import model_trust
from tests.helpers import environment_guard
from tests.helpers.paths import REPO

pytestmark = pytest.mark.slow


class _Planted(mlflow.pyfunc.PythonModel):
    """A python_model whose unpickling opens (creates) ``marker``: code run by loading the artifact."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))

    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture(autouse=True)
def restored_environment():
    """``mammo`` commands set MLflow/Prefect variables for their process; in-process runs must not leak them."""
    with environment_guard.restored_environment():
        yield


def _mammo(store: Path, *args: str):
    return CliRunner().invoke(app, ["predict", *args, "--store", str(store)])


def _patch(path: Path) -> Path:
    Image.fromarray(np.asarray(serving.example_input(32)["image"][0], dtype=np.uint8)).save(path)
    return path


def _artifact_folder(client: MlflowClient, name: str, version: str) -> Path:
    return Path(url2pathname(urlparse(client.get_model_version_download_uri(name, version)).path))


def test_a_cloudpickled_model_registered_as_latest_is_refused_and_never_unpickled(smoke_store_copy, tmp_path):
    store = smoke_store_copy
    uri = f"sqlite:///{store.resolve() / 'mlflow.db'}"
    client = MlflowClient(uri)
    marker = tmp_path / "planted_code_ran"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("mammo-fusion")
    # explicit requirements: inferring them would load (unpickle) the model in a subprocess while logging
    with mlflow.start_run(run_name="planted"):
        info = mlflow.pyfunc.log_model(name="planted", python_model=_Planted(marker), pip_requirements=["mlflow"],
                                       registered_model_name=serving.REGISTERED_NAME)
    plain = info.registered_model_version
    assert not marker.exists()
    patch = _patch(tmp_path / "patch.png")

    result = _mammo(store, str(patch))  # default: models:/mammo-classifier/latest = the planted version
    assert result.exit_code == 2, result.output
    assert f"refused to load models:/mammo-classifier/latest: mammo-classifier version {plain} was not " \
           f"registered by mammo-fusion" in " ".join(result.output.split())
    assert not marker.exists()

    # an attacker who can register can also write tags: forged digests of the planted files do not help
    with mlflow.start_run(run_name="planted-with-tags"):
        info = mlflow.pyfunc.log_model(name="planted", python_model=_Planted(marker), pip_requirements=["mlflow"],
                                       registered_model_name=serving.REGISTERED_NAME)
    forged = str(info.registered_model_version)
    digests = model_trust.file_digests(_artifact_folder(client, serving.REGISTERED_NAME, forged))
    assert "python_model.pkl" in digests
    client.set_model_version_tag(serving.REGISTERED_NAME, forged, model_trust.PRODUCER_TAG, model_trust.PRODUCER)
    client.set_model_version_tag(serving.REGISTERED_NAME, forged, model_trust.DIGESTS_TAG, json.dumps(digests))
    for args in ((str(patch),), ("--about",), (str(patch), "--model", f"models:/mammo-classifier/{forged}")):
        result = _mammo(store, *args)
        output = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert f"mammo-classifier version {forged}: the model ships code to run on load (python_model" in output
        assert len(result.output.strip().splitlines()) <= 3  # one message (rich may wrap it)
    assert not marker.exists()

    # our own version is still served, and the plant was real: plain MLflow runs its code on load
    assert _mammo(store, str(patch), "--model", "models:/mammo-classifier/1", "--json").exit_code == 0
    with pytest.raises(AttributeError):  # unpickling ran open(marker); MLflow then fails on what it returned
        mlflow.pyfunc.load_model(f"models:/{serving.REGISTERED_NAME}/{forged}")
    assert marker.exists()


def test_a_changed_or_added_file_in_the_registered_model_is_refused(smoke_store_copy, tmp_path):
    store = smoke_store_copy
    client = MlflowClient(f"sqlite:///{store.resolve() / 'mlflow.db'}")
    (version,) = client.search_model_versions(f"name='{serving.REGISTERED_NAME}'")
    folder = _artifact_folder(client, serving.REGISTERED_NAME, version.version)
    weights = folder / "data" / serving.DATA_FOLDER / "weights.pt"
    original = weights.read_bytes()
    patch = _patch(tmp_path / "patch.png")
    label = f"mammo-classifier version {version.version}"

    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0x01
    weights.write_bytes(bytes(changed))
    result = _mammo(store, str(patch))
    assert result.exit_code == 2
    assert f"{label}: data/mammo-classifier/weights.pt: sha256 differs from the digest recorded at " \
           f"registration" in " ".join(result.output.split())

    weights.write_bytes(original)
    (folder / "code").mkdir()
    (folder / "code" / "sitecustomize.py").write_text("open('x', 'w')\n")
    result = _mammo(store, str(patch))
    assert result.exit_code == 2
    assert f"{label}: code/sitecustomize.py: file not recorded at registration" in " ".join(result.output.split())

    (folder / "code" / "sitecustomize.py").unlink()
    (folder / "code").rmdir()
    result = _mammo(store, str(patch), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["error"] is None


def test_flavor_check_refuses_models_from_code_foreign_loaders_and_other_flavors(tmp_path):
    """The MLmodel rules on their own (a version could also be registered with forged digests)."""
    def mlmodel(text: str) -> Path:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "MLmodel").write_text(text)
        return folder

    ours = "flavors:\n  python_function:\n    loader_module: tasks.serving.classifier\n    data: data/x\n"
    assert model_trust.check_flavor(mlmodel(ours), "mammo-classifier") == "tasks.serving.classifier"
    cases = {
        "flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n    model_code_path: m.py\n":
            "ships code to run on load (model_code_path)",
        "flavors:\n  python_function:\n    loader_module: tasks.serving.classifier\n    code: code\n":
            "ships code to run on load (code)",
        "flavors:\n  python_function:\n    loader_module: os\n": "loader module 'os' is not this project's",
        "flavors:\n  python_function:\n    loader_module: tasks.serving.detector\n":
            "loader module 'tasks.serving.detector' is not this project's",
        ours + "  sklearn:\n    pickled_model: model.pkl\n": "flavors ['python_function', 'sklearn']",
        "flavors: !!python/object/apply:os.system ['true']\n": "MLmodel is not plain YAML",
    }
    for text, reason in cases.items():
        with pytest.raises(model_trust.UntrustedModel, match=reason.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            model_trust.check_flavor(mlmodel(text), "mammo-classifier")
    with pytest.raises(model_trust.UntrustedModel, match="only registered models are loaded"):
        model_trust.resolve_version(None, "runs:/abc/model")
    with pytest.raises(model_trust.UntrustedModel, match="is not one of this project's models"):
        model_trust.resolve_version(None, "models:/other/1")


def test_served_paths_only_under_the_root_given_at_serve_time(smoke_store, tmp_path, monkeypatch):
    root = tmp_path / "served"
    root.mkdir()
    inside = _patch(root / "patch.png")
    (root / "folder").mkdir()
    (root / "escape.png").symlink_to(_patch(tmp_path / "outside.png"))
    verified = model_trust.fetch_verified(f"models:/{serving.REGISTERED_NAME}@candidate",
                                          f"sqlite:///{smoke_store.resolve() / 'mlflow.db'}", tmp_path / "model")
    refused = [str(tmp_path / "outside.png"), "escape.png", "../outside.png", str(root / "absent.png"), "folder",
               "/etc/passwd"]

    monkeypatch.delenv(ENV_ROOT, raising=False)  # default: arrays only
    model = mlflow.pyfunc.load_model(str(verified.path))
    out = model.predict(pd.DataFrame({"path": [str(inside)]}))
    assert out[serving.ERROR].tolist() == [REFUSED_PATH]

    monkeypatch.setenv(ENV_ROOT, str(root))
    monkeypatch.setenv(ENV_MAX_PIXELS, str(40 * 40))
    model = mlflow.pyfunc.load_model(str(verified.path))
    out = model.predict(pd.DataFrame({"path": ["patch.png", str(inside), *refused]}))
    assert out[serving.ERROR].tolist() == ["", ""] + [REFUSED_PATH] * len(refused)  # no existence oracle
    assert out[serving.PREDICTED].iloc[0] == out[serving.PREDICTED].iloc[1] != ""
    big = np.full((41, 40), 100, dtype=np.uint8)
    out = model.predict(pd.DataFrame({"image": [big.tolist(), np.full((40, 40), 100, np.uint8).tolist()]}))
    assert out[serving.ERROR].iloc[0] == f"image of {41 * 40} pixels exceeds the served limit of {40 * 40} " \
                                         f"({ENV_MAX_PIXELS})"
    assert out[serving.ERROR].iloc[1] == ""  # the other row is still classified

    monkeypatch.setenv(ENV_MAX_ROWS, "2")
    with pytest.raises(ValueError, match=r"3 rows; at most 2"):
        mlflow.pyfunc.load_model(str(verified.path)).predict(pd.DataFrame({"image": [big.tolist()] * 3}))

    detector = model_trust.fetch_verified("models:/mammo-detector/latest",
                                          f"sqlite:///{smoke_store.resolve() / 'mlflow.db'}", tmp_path / "detector")
    pipeline = mlflow.pyfunc.load_model(str(detector.path)).unwrap_python_model().pipeline
    out = pipeline.predict_frame(pd.DataFrame({"path": [str(inside), "/etc/passwd"]}))  # no root: none read
    assert out["error"].tolist() == [REFUSED_PATH, REFUSED_PATH]


def test_serve_limits_refuse_alike_and_cap_files(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "small.png").write_bytes(b"x" * 10)
    (root / "large.png").write_bytes(b"x" * 11)
    limits = ServeLimits(root=root.resolve(), max_file_bytes=10)
    assert limits.allowed_file("small.png", "row 0") == (root / "small.png").resolve()
    for path in ("large.png", "missing.png", "..", str(tmp_path), "small.png\x00.txt"):
        with pytest.raises(Exception, match="^row 0: path refused") as err:
            limits.allowed_file(path, "row 0")
        assert err.value.reason == REFUSED_PATH
    with pytest.raises(ValueError, match=f"{ENV_ROOT}='/no/such/folder' is not a folder"):
        ServeLimits.from_env({ENV_ROOT: "/no/such/folder"})
    with pytest.raises(ValueError, match=f"{ENV_MAX_PIXELS}='many' is not an integer"):
        ServeLimits.from_env({ENV_MAX_PIXELS: "many"})
    named = ServeLimits().for_named_files([root / "small.png"])
    assert named.allowed_file(str(root / "small.png"), "input 1") == (root / "small.png").resolve()
    with pytest.raises(Exception, match="path refused"):
        named.allowed_file(str(root / "large.png"), "input 2")


def _stage_folder(store: Path, stage: str):
    art = ArtifactStore(store)
    (folder,) = [p for p in art.stage_dir(stage).iterdir() if (p / "manifest.json").is_file()]
    return art.find(stage, folder.name)


def test_predict_about_prints_each_model_card_from_the_stage_artifacts(smoke_store):
    classify, detect = _stage_folder(smoke_store, "classify"), _stage_folder(smoke_store, "detect")
    curate = _stage_folder(smoke_store, "curate")
    report = json.loads((curate.path / "curation_report.json").read_text())
    source = json.loads((_stage_folder(smoke_store, "acquire").path / "source.json").read_text())["source"]
    with open(classify.path / "table5_classifiers.csv", newline="") as fh:
        fusion = next(r for r in csv.DictReader(fh) if r["classifier"] == "fusion")

    result = _mammo(smoke_store, "--about")
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    assert card["registered_model"] == serving.REGISTERED_NAME and card["intended_use"] == "research; not for diagnosis"
    assert card["classes"] == json.loads((classify.path / "classifier.json").read_text())["class_names"]
    assert card["inputs"]["modality"].startswith("MG") and card["inputs"]["bit_depth"] == [8, 16]
    size = json.loads((_stage_folder(smoke_store, "train").path / "model_config.json").read_text())["patch_size"]
    assert card["inputs"]["patch_size"] == [size, size] and "display orientation" in card["inputs"]["orientation"]
    assert card["training_data"]["source"] == source == "phantom"
    assert card["training_data"]["images_per_split"] == report["images_per_split"]
    assert card["training_data"]["patients"] == report["patients"]
    accuracy = card["metrics"]["accuracy"]
    assert (accuracy["value"], accuracy["ci_low"], accuracy["ci_high"]) == (
        float(fusion["test_acc"]), float(fusion["test_acc_ci_low"]), float(fusion["test_acc_ci_high"]))
    assert accuracy["confidence"] == 0.95 and "100 resamples" in accuracy["ci_method"]  # smoke.yaml n_boot
    assert card["code_version"]["package_version"] and card["code_version"]["stage_key"] == classify.key
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert card["code_version"]["git_commit"] == head.stdout.strip()

    result = _mammo(smoke_store, "--about", "--model", "models:/mammo-detector/latest")
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    detection = json.loads((detect.path / "detection.json").read_text())
    ours = next(r for r in detection["rows"] if r["model"] == "ours")
    assert card["name"] == "mammo-detector" and card["intended_use"] == "research; not for diagnosis"
    assert card["classes"] == json.loads((detect.path / "detector_config.json").read_text())["classes"]
    assert card["inputs"]["input_size"] == detection["input_size"]
    assert card["metrics"]["map50"] == pytest.approx(ours["map50"]) and card["metrics"]["ci"].startswith("not")
    assert card["training_data"]["detector_images_per_split"] == detection["split_images"]
    assert card["code_version"]["stage_key"] == detect.key


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mammo_serve_serves_the_champion_over_http_reading_paths_only_under_its_root(smoke_store_copy, tmp_path):
    """A real ``mlflow models serve`` process behind ``mammo serve``, on ``models:/mammo-classifier@champion``."""
    import sys
    import time
    import urllib.request

    from tests.helpers.processes import clean_env, stop_process

    store = smoke_store_copy
    client = MlflowClient(f"sqlite:///{store.resolve() / 'mlflow.db'}")
    candidate = client.get_model_version_by_alias(serving.REGISTERED_NAME, "candidate").version
    client.set_registered_model_alias(serving.REGISTERED_NAME, "champion", candidate)
    root = tmp_path / "served"
    root.mkdir()
    _patch(root / "patch.png")
    port = _free_port()
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--store", str(store), "--port", str(port),
                                 "--allowed-root", str(root)], env=clean_env(PYTHONPATH=str(REPO)), stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(1)
            body = {"dataframe_split": {"columns": ["path"],
                                        "data": [["patch.png"], ["/etc/passwd"], [str(root / "absent.png")]]}}
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as r:
                rows = json.loads(r.read())["predictions"]
        finally:
            stop_process(proc)
    assert [r["error"] for r in rows] == ["", REFUSED_PATH, REFUSED_PATH]
    assert rows[0]["predicted_class"] in json.loads((_stage_folder(store, "classify").path
                                                     / "classifier.json").read_text())["class_names"]
    assert f"serving mammo-classifier version {candidate}" in (tmp_path / "serve.log").read_text()
