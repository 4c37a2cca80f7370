"""Process environment for Prefect and MLflow, set before either is imported.

Prefect reads its settings when first imported, so the CLI calls :func:`configure` first. Values the
user already exported win (``setdefault``): a team pointing ``PREFECT_API_URL`` at its server or
``MLFLOW_TRACKING_URI`` at its tracking server keeps that.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORE = ".mammo"


def store_root(explicit: str | Path | None = None) -> Path:
    """``--store``, else ``$MAMMO_STORE``, else ``./.mammo``."""
    return Path(explicit or os.environ.get("MAMMO_STORE") or DEFAULT_STORE).expanduser().resolve()


def configure(store: Path) -> None:
    from mammo_core.storage.store import make_private

    make_private(store)  # the store holds patient-derived images: private from its first file on
    prefect_home = store / "prefect"
    defaults = {
        "MAMMO_STORE": str(store),
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_LOCAL_STORAGE_PATH": str(prefect_home / "storage"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # Anything Prefect persists into the store is JSON: its default (pickle) would run code when loaded.
        "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
        # A first start on a fresh machine migrates the database: the 20 s default is too short there.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def load_params_or_exit(path: Path, overrides: list[str]):
    """Validated params, or the schema's message (file and key named) and exit code 2 for the CLI."""
    import typer
    from rich.console import Console

    from mammo_core.config import load_params
    from mammo_core.errors import ParamsError

    try:
        return load_params(path, overrides)
    except ParamsError as exc:
        Console(stderr=True).print(f"[bold red]invalid params[/]\n{exc}")
        raise typer.Exit(2) from None
