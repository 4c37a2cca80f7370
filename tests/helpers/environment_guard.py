"""Tests that call `mammo` commands in-process: the commands set MLflow/Prefect variables for their process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow


@contextmanager
def restored_environment() -> Iterator[None]:
    """Put ``os.environ`` and MLflow's tracking URI back as they were, so in-process runs leak nothing."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        mlflow.set_tracking_uri(None)
