"""The lesion detector as an MLflow pyfunc model: full mammogram -> boxes with class and score.

What is served is the detect stage's own detector ("ours": fused DenseNet + FPN + hash head), rebuilt
from ``detector_config.json`` and ``detector.pt`` (``weights_only=True``; nothing is unpickled and nothing
from the artifact folder is imported: like the classifier in ``tasks/serving/classifier.py``, and logged by the
same ``tasks/serving/registration.py``, the model names this module as its ``loader_module``, and registration
records every file's sha256).

The detector, its input reading, preprocessing, path policy and output table are plain code in
``mammo_core.inference.served_detector`` (:class:`DetectorPipeline`); this module wraps it for
``mlflow.pyfunc`` (:class:`DetectorModel`, with the serving limits read from the environment at load time)
and logs/registers it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mammo_core.inference.served_detector import DetectorPipeline
from mammo_core.inference.served_inputs import ServeLimits
from mammo_core.storage import stage_files
from tasks.serving import registration

REGISTERED_NAME = "mammo-detector"
LOGGED_NAME = "mammo-detector"
DATA_FOLDER = "mammo-detector"
SERVED_FILES = {"weights": stage_files.DETECT.weights, "config": stage_files.DETECT.config}


class DetectorModel:
    """What ``mlflow.pyfunc`` loads (through :func:`_load_pyfunc`): the pipeline and the serving limits."""

    def __init__(self, pipeline: DetectorPipeline, limits: ServeLimits):
        self.pipeline = pipeline
        self.limits = limits

    @property
    def python_model(self) -> DetectorModel:
        """What ``PyFuncModel.unwrap_python_model()`` returns: this object."""
        return self

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        min_score = float((params or {}).get("min_score", 0.05))
        return self.pipeline.predict_frame(pd.DataFrame(model_input), min_score, self.limits)


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> DetectorModel:
    """MLflow's ``loader_module`` entry point: the detector from the logged model's data folder."""
    files = {name: Path(data_path) / file for name, file in SERVED_FILES.items()}
    return DetectorModel(DetectorPipeline.load(files), ServeLimits.from_env())


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "path")])
    outputs = Schema([ColSpec("long", "input"), *(ColSpec("double", c) for c in ("x0", "y0", "x1", "y1")),
                      ColSpec("string", "class"), ColSpec("double", "score"), ColSpec("string", "error")])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("min_score", "double", 0.05)]))


def log_model(client, run_id: str, files: Mapping[str, str], card: dict,
              registered_name: str | None = REGISTERED_NAME) -> tuple[Any, str | None]:
    """Log the detector (``files``: ``weights``, ``config``) with its card and register it: (ModelInfo, version)."""
    served = {SERVED_FILES[k]: v for k, v in files.items()}
    return registration.log_served_model(client, run_id, DATA_FOLDER, served, card, registered_name,
                                         loader_module=__name__, signature=signature())


def log_and_register(ctx, registered_name: str = REGISTERED_NAME):
    """From the detect stage, after ``detector.pt``, ``detector_config.json`` and ``detection.json`` are written."""
    from tasks.serving.model_card import detector_card
    from tasks.stages.detect import CONFIG_FILE, WEIGHTS_FILE

    files = {"weights": str(ctx.workdir / WEIGHTS_FILE), "config": str(ctx.workdir / CONFIG_FILE)}
    card = detector_card(ctx.store_root, ctx.workdir, ctx.upstream["curate"].key, ctx.key)
    info, version = log_model(ctx.client, ctx.run_id, files, card, registered_name)
    registration.tag_registered(ctx, info, registered_name, version)
    ctx.logger.info("detect: served model %s registered as %s version %s", info.model_id, registered_name, version)
    return info
