"""``mammo predict PATCH...``: class probabilities of lesion patches from the registered classifier.

The model is an MLflow model URI, by default ``models:/mammo-classifier/latest`` (what the classify stage
registers, see ``tasks/serving.py``), read from the store's embedded SQLite tracking database unless
``MLFLOW_TRACKING_URI`` points elsewhere. Each input is a patch file (PNG, JPEG or DICOM) cut around a
lesion; 8-bit files are taken to be on the patches stage's scale, 16-bit ones and DICOM are mapped like the
patches stage does (details in ``tasks/serving.py``).

Inputs are reported by their position on the command line, never by path: CBIS file names carry patient
ids. An unreadable file gets its reason and no probabilities; the others are still classified (exit 1).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from flows import environment

DEFAULT_MODEL = "models:/mammo-classifier/latest"
DETECTOR_NAME = "mammo-detector"
console = Console(stderr=True)


def registered_name(model_uri: str) -> str | None:
    """The registered model name of a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI, else None."""
    match = re.match(r"^models:/+([^/@]+)(?:[/@].*)?$", model_uri.strip())
    return match.group(1) if match else None


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[bold red]{message}[/]", soft_wrap=True)
    return typer.Exit(code)


def _load(model_uri: str, tracking_uri: str):
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        name = registered_name(model_uri)
        if name is None or exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = sorted(m.name for m in mlflow.MlflowClient(tracking_uri).search_registered_models())
        raise _fail(f"no registered model {name!r} (or no such version) in {tracking_uri}; registered: "
                    f"{known or 'none'}. The classify stage of `mammo run` registers mammo-classifier.") from None


def results(frame, class_names: list[str]) -> list[dict]:
    """One JSON-ready dict per input row: 1-based ``input`` index, probabilities, predicted class, error."""
    out = []
    for i, row in enumerate(frame.to_dict("records"), start=1):
        ok = not row.get("error")
        out.append({
            "input": i,
            "probabilities": {c: float(row[c]) for c in class_names} if ok else None,
            "predicted_class": row["predicted_class"] if ok else None,
            "error": None if ok else row["error"],
        })
    return out


def predict(
    inputs: list[Path] = typer.Argument(..., help="patch files (PNG, JPEG or DICOM)"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="MLflow model URI"),
    store: Path | None = typer.Option(None, "--store", help="artifact store (default $MAMMO_STORE or .mammo)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON (a list, one object per input) on stdout"),
) -> None:
    """Class probabilities of lesion patches from a registered classifier (inputs in command-line order)."""
    if registered_name(model) == DETECTOR_NAME:
        raise _fail(f"{model}: the lesion detector ({DETECTOR_NAME}) is not part of this pipeline yet, so no such "
                    f"model is registered. Classify lesion patches with --model {DEFAULT_MODEL}.")
    root = environment.store_root(store)
    environment.configure(root)
    import pandas as pd

    from tasks.serving import PREDICTED
    from tasks.tracking import default_tracking_uri

    loaded = _load(model, default_tracking_uri(root))
    frame = loaded.predict(pd.DataFrame({"path": [str(p) for p in inputs]}))
    for path, k in zip(inputs, range(1, len(inputs) + 1), strict=True):  # belt and braces: no path in output
        frame["error"] = frame["error"].str.replace(str(path), f"input {k}", regex=False)
    class_names = [c for c in frame.columns if c not in (PREDICTED, "error")]
    rows = results(frame, class_names)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
    else:  # one column per input: class names are long, inputs are few
        table = Table(title=model)
        table.add_column("class")
        for row in rows:
            table.add_column(f"input {row['input']}", justify="right")
        for c in class_names:
            table.add_row(c, *(f"{r['probabilities'][c]:.3f}" if r["probabilities"] else "-" for r in rows))
        table.add_row(f"[bold]{PREDICTED}[/]", *(r["predicted_class"] or f"[red]{r['error']}[/]" for r in rows))
        Console().print(table)
    if any(r["error"] for r in rows):
        raise typer.Exit(1)
