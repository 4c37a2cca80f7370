"""Logging and registering one of this project's served models in MLflow, written once for both of them.

The classifier (``classifier.py``) and the detector (``detector.py``) differ in their files, signature
and loader module; everything else is here: the model's files and card copied into ``data/<name>/``, a
pyfunc LoggedModel of the stage's run, pinned requirements, registration through ``model_trust.register``
(which records every file's sha256), and the run tags that name the registered version.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from mammo_core.storage.store import write_json_atomic

_URI_LOCK = threading.Lock()


@contextmanager
def tracking_uri_set(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the block, then restored (env variable included).

    ``Model.log`` and registration resolve the tracking store from the process-global URI only. The lock
    keeps two stage threads from interleaving their set/restore.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _URI_LOCK:
        if mlflow.get_tracking_uri() == uri:
            yield
            return
        before, env_before = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before)
            if env_before is not None:
                os.environ["MLFLOW_TRACKING_URI"] = env_before


def requirements() -> list[str]:
    """Pinned versions of what the served models import (MLflow writes them to requirements.txt)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "scikit-learn", "skops", "numpy", "pandas", "pillow", "pydicom", "scipy",
                 "scikit-image"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def log_served_model(client, run_id: str, name: str, files: Mapping[str, str | os.PathLike], card: dict,
                     registered_name: str | None, **model_kwargs) -> tuple[Any, str | None]:
    """Log one of our models as a pyfunc LoggedModel of run ``run_id`` and register it: (ModelInfo, version).

    The model's files (``files``: name inside the data folder -> source file) and its card go into
    ``data/<name>/``; MLflow loads it by importing ``loader_module`` (``model_kwargs``) from the installed
    package. Registration goes through ``tasks.serving.model_trust.register``, which records every file's sha256
    in the registry. Explicit run id and client, no active run: stages run in Prefect worker threads; the
    LoggedModel is created in the run's experiment (without an active run MLflow would pick the default).
    """
    import shutil

    from mlflow.models import Model

    from tasks.serving import model_trust
    from tasks.serving.model_card import CARD_FILE

    experiment_id = client.get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory(prefix="mammo-serving-") as tmp, tracking_uri_set(client.tracking_uri):
        data = Path(tmp) / name
        data.mkdir()
        for file_name, source in files.items():
            shutil.copyfile(source, data / file_name)
        write_json_atomic(data / CARD_FILE, card)
        logged = client.create_logged_model(experiment_id=experiment_id, name=name, source_run_id=run_id)
        info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
                         model_id=logged.model_id, data_path=str(data), pip_requirements=requirements(),
                         **model_kwargs)
        version = model_trust.register(client, info.model_uri, registered_name, run_id) if registered_name else None
    return info, version


def tag_registered(ctx, info, registered_name: str, version: str | None) -> None:
    """Tag the stage's run with the logged model and the registered version it became."""
    ctx.set_tags({"serving.model_id": info.model_id, "serving.registered_model": registered_name,
                  "serving.registered_version": str(version)})
