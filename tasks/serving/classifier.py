"""The end-to-end classifier as an MLflow pyfunc model: patch -> branches -> fusion -> hash codes -> SVM/kNN/RF.

What is served is exactly what the pipeline measured: the train stage's Freeze1..3 weights, the features
stage's fusion weights, the hashing stage's decoder at ``classify.codes`` (decoder@bits) and the classify
stage's fused classifier. The chain itself, its input rules (bit depth, intensity, resize) and its output
table are plain code in ``mammo_core.inference.served_classifier`` (:class:`ClassifierPipeline`);
:class:`ClassifierModel` wraps it for ``mlflow.pyfunc``; :func:`log_and_register` logs it to the classify
stage's MLflow run and registers it as ``mammo-classifier``.

Safety: nothing is unpickled and nothing from the artifact folder is imported. The model is logged with
this module as its ``loader_module`` (MLflow imports it from the installed package and calls
:func:`_load_pyfunc`), torch weights load with ``weights_only=True``, and the skops file loads through
``mammo_core.codes.model_io.load_model`` after its sha256 is checked against the digest in the MLmodel's
``model_config``. Registration records the sha256 of every file of the logged model in the registry
(``tasks.serving.model_trust``), and ``mammo predict`` / ``mammo serve`` check them and the flavor before loading.

Served inputs: the limits (``mammo_core.inference.served_inputs``) are read from the serving process's
environment when MLflow loads the model (:func:`_load_pyfunc`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammo_core.codes import model_io
from mammo_core.inference.served_classifier import ERROR, PREDICTED, ClassifierPipeline
from mammo_core.inference.served_inputs import ServeLimits
from mammo_core.storage import stage_files
from mammo_core.storage.store import ArtifactStore, write_json_atomic
from tasks.serving import registration

REGISTERED_NAME = "mammo-classifier"
LOGGED_NAME = "mammo-classifier"
DATA_FOLDER = "mammo-classifier"  # the model's files, under data/ of the logged model
PREPROCESSING_FILE = "preprocessing.json"

# artifact name -> file name inside its stage folder (the decoder's is filled in from classify.codes)
ARTIFACT_FILES: dict[str, str | None] = {
    "weights": stage_files.TRAIN.weights,
    "model_config": stage_files.TRAIN.model_config,
    "fusion": stage_files.FEATURES.fusion,
    "decoder": None,
    "hashing": stage_files.HASHING.summary,
    "classifier_model": stage_files.CLASSIFY.model,
    "classifier": stage_files.CLASSIFY.summary,
    "preprocessing": PREPROCESSING_FILE,
}
# artifact name -> file name inside the logged model's data folder
SERVED_FILES = {name: (file or "decoder.pt") for name, file in ARTIFACT_FILES.items()}


# --------------------------------------------------------------------------------------- pyfunc model

class ClassifierModel:
    """What ``mlflow.pyfunc`` loads (through :func:`_load_pyfunc`): the pipeline and the serving limits.

    ``limits`` come from the serving process's environment at load time (``mammo_core.inference.served_inputs``).
    """

    def __init__(self, pipeline: ClassifierPipeline, limits: ServeLimits):
        self.pipeline = pipeline
        self.limits = limits

    @property
    def python_model(self) -> ClassifierModel:
        """What ``PyFuncModel.unwrap_python_model()`` returns: this object."""
        return self

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self.pipeline.predict_frame(model_input, self.limits)


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> ClassifierModel:
    """MLflow's ``loader_module`` entry point: the served classifier from the logged model's data folder."""
    expected = (model_config or {}).get("fusion_sha256")
    files = {name: Path(data_path) / file for name, file in SERVED_FILES.items()}
    if not expected:
        raise model_io.ModelFileError("the model's MLmodel records no fusion_sha256: refusing to load "
                                      f"{files['classifier_model']}")
    return ClassifierModel(ClassifierPipeline.load(files, expected), ServeLimits.from_env())


# ------------------------------------------------------------------------------------------- logging

def gather_artifacts(store_root: str | os.PathLike, classify_dir: str | os.PathLike, train_key: str,
                     hashing_key: str) -> tuple[dict[str, str], str]:
    """(artifact name -> file, skops sha256) for a classify output and its upstream stage folders.

    The features folder (fusion weights) and the patches params (intensity mapping) are found through the
    hashing and train manifests. Writes ``preprocessing.json`` into ``classify_dir``. ValueError when a
    folder is missing or the lineage is inconsistent (fusion weights chosen for another network).
    """
    store = ArtifactStore(store_root)
    classify_dir = Path(classify_dir)

    def folder(stage: str, key: str):
        found = store.find(stage, key)
        if found is None:
            raise ValueError(f"{store.root}: no finished {stage} folder with key {key}")
        return found

    train, hashing_folder = folder("train", train_key), folder("hashing", hashing_key)
    feats = folder("features", hashing_folder.manifest["upstream"]["features"])
    patches_folder = folder("patches", train.manifest["upstream"]["patches"])
    fusion = json.loads((feats.path / stage_files.FEATURES.fusion).read_text(encoding="utf-8"))
    if fusion.get("model_key") != train_key:
        raise ValueError(f"fusion weights of {feats.path} were chosen for train {fusion.get('model_key')}, "
                         f"not {train_key}")
    classifier = json.loads((classify_dir / ARTIFACT_FILES["classifier"]).read_text(encoding="utf-8"))
    kind, bits = classifier["codes"].split("@")
    prep = patches_folder.manifest["params"]["patches"]
    write_json_atomic(classify_dir / PREPROCESSING_FILE, {"intensity": prep["intensity"], "size": prep["size"]})
    files = {
        "weights": train.path / ARTIFACT_FILES["weights"],
        "model_config": train.path / ARTIFACT_FILES["model_config"],
        "fusion": feats.path / ARTIFACT_FILES["fusion"],
        "decoder": hashing_folder.path / "decoders" / f"{kind}_{bits}.pt",
        "hashing": hashing_folder.path / ARTIFACT_FILES["hashing"],
        "classifier_model": classify_dir / ARTIFACT_FILES["classifier_model"],
        "classifier": classify_dir / ARTIFACT_FILES["classifier"],
        "preprocessing": classify_dir / PREPROCESSING_FILE,
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ValueError(f"cannot build the served classifier, missing: {missing}")
    return {k: str(v) for k, v in files.items()}, classifier["sha256"]


def example_input(patch_size: int) -> pd.DataFrame:
    """A synthetic 8-bit patch (a smooth blob on grey): a valid input that holds no patient pixels."""
    yy, xx = np.mgrid[0:patch_size, 0:patch_size].astype(np.float32)
    c = (patch_size - 1) / 2.0
    blob = 90.0 + 120.0 * np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / (2.0 * (patch_size / 5.0) ** 2))
    return pd.DataFrame({"image": [np.rint(blob).astype(np.uint8).tolist()]})


def signature_for(class_names: Sequence[str]):
    """Input: optional ``image`` (2-D integer array) and ``path`` (string); output: probabilities + class."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec(Array(Array("long")), "image", required=False),
                     ColSpec("string", "path", required=False)])
    outputs = Schema([*(ColSpec("double", name) for name in class_names), ColSpec("string", PREDICTED),
                      ColSpec("string", ERROR)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_model(client, run_id: str, files: Mapping[str, str], sha256: str, card: dict,
              registered_name: str | None = REGISTERED_NAME) -> tuple[Any, str | None]:
    """Log the served classifier (``files`` as :func:`gather_artifacts` gives them) and register it."""
    class_names = json.loads(Path(files["classifier"]).read_text(encoding="utf-8"))["class_names"]
    patch_size = int(json.loads(Path(files["model_config"]).read_text(encoding="utf-8"))["patch_size"])
    return registration.log_served_model(
        client, run_id, DATA_FOLDER, {SERVED_FILES[k]: v for k, v in files.items()}, card, registered_name,
        loader_module=__name__, model_config={"fusion_sha256": sha256}, signature=signature_for(class_names),
        input_example=example_input(patch_size))


def log_and_register(ctx, registered_name: str = REGISTERED_NAME):
    """From the classify stage (after ``fusion.skops`` and ``classifier.json`` are written): log + register.

    Adds ``preprocessing.json`` to the classify folder, logs the model card with the model and tags the
    run with the model version.
    """
    from tasks.serving.model_card import classifier_card

    train_key = ctx.upstream["train"].key
    files, sha256 = gather_artifacts(ctx.store_root, ctx.workdir, train_key, ctx.upstream["hashing"].key)
    n_boot = ctx.params.classify.n_boot if ctx.params is not None else None
    card = classifier_card(ctx.store_root, ctx.workdir, train_key, ctx.key, n_boot)
    info, version = log_model(ctx.client, ctx.run_id, files, sha256, card, registered_name)
    registration.tag_registered(ctx, info, registered_name, version)
    if version is not None:  # `mammo promote` moves `champion` here once the numbers say so
        ctx.client.set_registered_model_alias(registered_name, "candidate", str(version))
    ctx.logger.info("classify: served model %s registered as %s version %s", info.model_id, registered_name, version)
    return info
