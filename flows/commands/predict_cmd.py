"""``mammo predict``: class probabilities of lesion patches, or lesion boxes on full mammograms.

With ``--model models:/mammo-detector/latest`` (what the detect stage registers, ``tasks/serving/detector.py``)
each input is a full mammogram (DICOM, or an 8-bit/16-bit PNG or JPEG of any size); ``--out`` writes the
boxes (class, score, corners in pixels of the original image) as JSON and ``--overlay`` a PNG of the boxes
drawn on the windowed image (``name-2.png`` etc. for the second and later inputs). Otherwise, as follows:

The model is an MLflow model URI, by default ``models:/mammo-classifier/latest`` (what the classify stage
registers, see ``tasks/serving/classifier.py``), read from the store's embedded SQLite tracking database unless
``MLFLOW_TRACKING_URI`` points elsewhere. Each input is a patch file (PNG, JPEG or DICOM) cut around a
lesion; 8-bit files are taken to be on the patches stage's scale, 16-bit ones and DICOM are mapped like the
patches stage does (details in ``mammo_core/inference/served_classifier.py``).

Inputs are reported by their position on the command line, never by path: CBIS file names carry patient
ids. An unreadable file gets its reason and no probabilities; the others are still classified (exit 1).

Only this project's own registered models are loaded (``tasks.serving.model_trust``): before anything is
unpickled or imported from the model, its registry version must carry the file digests recorded at
registration, its downloaded files must match them, and its MLmodel must name our loader module from the
installed package. Anything else is refused with one line saying why (exit 2). ``--about`` prints the
model card logged with the version (what it takes, its classes, training data, metrics, intended use,
code version) without loading the model.
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


def fetch_model(model_uri: str, tracking_uri: str, dst: Path):
    """The verified local copy of a registered model of ours (``tasks.serving.model_trust``), or a one-line refusal."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks.serving.model_trust import UntrustedModel, fetch_verified

    name = registered_name(model_uri)
    not_found = None
    if name is not None:
        known = sorted(m.name for m in mlflow.MlflowClient(tracking_uri).search_registered_models())
        not_found = (f"no registered model {name!r} (or no such version) in {tracking_uri}; registered: "
                     f"{known or 'none'}. The classify stage of `mammo run` registers mammo-classifier, "
                     f"the detect stage {DETECTOR_NAME}.")
        if name not in known:
            raise _fail(not_found)
    try:
        return fetch_verified(model_uri, tracking_uri, dst)
    except UntrustedModel as exc:
        raise _fail(f"refused to load {model_uri}: {exc}") from None
    except MlflowException as exc:
        if not_found is None or exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise _fail(not_found) from None


def model_card(verified) -> dict:
    """The card logged with a verified model version, with the registry name and version added."""
    from tasks.serving.model_card import CARD_FILE

    cards = sorted(verified.path.glob(f"data/*/{CARD_FILE}"))
    if not cards:
        raise _fail(f"{verified.name} version {verified.version} has no {CARD_FILE} (registered before model "
                    f"cards were logged)")
    card = json.loads(cards[0].read_text(encoding="utf-8"))
    return {"registered_model": verified.name, "version": verified.version, **card}


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
    inputs: list[Path] = typer.Argument(None, help="patch files (PNG, JPEG or DICOM)"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="MLflow model URI"),
    store: Path | None = typer.Option(None, "--store", help="artifact store (default $MAMMO_STORE or .mammo)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON (a list, one object per input) on stdout"),
    out: Path | None = typer.Option(None, "--out", help="detector: write the boxes as JSON to this file"),
    overlay: Path | None = typer.Option(None, "--overlay", help="detector: PNG with the boxes on the image"),
    min_score: float = typer.Option(0.3, "--min-score", help="detector: keep boxes scoring at least this"),
    about: bool = typer.Option(False, "--about", help="print the model card (inputs, classes, training data, "
                               "metrics, intended use, code version) and exit"),
) -> None:
    """Class probabilities of lesion patches, or lesion boxes on mammograms with --model models:/mammo-detector/..."""
    import tempfile

    root = environment.store_root(store)
    environment.configure(root)
    from tasks.tracking import default_tracking_uri

    if not inputs and not about:
        raise _fail("give the patch (or mammogram) files to classify, or --about for the model card")
    with tempfile.TemporaryDirectory(prefix="mammo-predict-") as tmp:
        verified = fetch_model(model, default_tracking_uri(root), Path(tmp))
        if about:
            typer.echo(json.dumps(model_card(verified), indent=2))
            return
        import mlflow

        loaded = mlflow.pyfunc.load_model(str(verified.path))
    python_model = loaded.unwrap_python_model()
    if verified.name == DETECTOR_NAME:
        detect_files(python_model.pipeline, model, inputs, out, overlay, min_score, json_out)
        return
    if out is not None or overlay is not None:
        raise _fail(f"{model} is a patch classifier: --out and --overlay apply to the detector "
                    f"(--model models:/{DETECTOR_NAME}/latest)")
    classify_files(python_model.pipeline, model, inputs, json_out)


def classify_files(pipeline, model: str, inputs: list[Path], json_out: bool) -> None:
    """Class probabilities per patch file as a table or JSON; exit 1 if any input failed."""
    import pandas as pd

    from mammo_core.inference.served_classifier import PREDICTED
    from mammo_core.inference.served_inputs import ServeLimits

    limits = ServeLimits().for_named_files(inputs)  # the files this user named, nothing else
    frame = pipeline.predict_frame(pd.DataFrame({"path": [str(p) for p in inputs]}), limits)
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


def _overlay_path(overlay: Path, k: int) -> Path:
    return overlay if k == 1 else overlay.with_name(f"{overlay.stem}-{k}{overlay.suffix or '.png'}")


def detect_files(pipeline, model: str, inputs: list[Path], out: Path | None, overlay: Path | None,
                 min_score: float, json_out: bool) -> None:
    """Boxes per mammogram from the detector; JSON to ``out``/stdout, overlays; exit 1 if any input failed."""
    from mammo_core.errors import BadItem
    from mammo_core.inference.served_detector import read_mammogram, save_overlay
    from mammo_core.storage.store import write_json_atomic

    rows = []
    for k, path in enumerate(inputs, start=1):
        try:
            image = read_mammogram(path)
            found = pipeline.detect(image, min_score)
            row = {"input": k, "height": int(image.shape[0]), "width": int(image.shape[1]),
                   "detections": [d.to_dict() for d in found], "error": None}
            if overlay is not None:
                save_overlay(image, found, _overlay_path(overlay, k))
        except BadItem as exc:  # the reason, never the path: CBIS file names carry patient ids
            row = {"input": k, "detections": None, "error": exc.reason.replace(str(path), f"input {k}")}
        rows.append(row)
    result = {"model": model, "classes": list(pipeline.config.classes), "min_score": min_score,
              "box_format": "x0, y0, x1, y1 in pixels of the original image", "results": rows}
    if out is not None:
        write_json_atomic(out, result)
    if json_out or out is None:
        typer.echo(json.dumps(result, indent=2))
    for row in rows:
        if row["error"]:
            console.print(f"[red]input {row['input']}: {row['error']}[/]")
        else:
            console.print(f"input {row['input']}: {len(row['detections'])} boxes with score >= {min_score}")
    if any(r["error"] for r in rows):
        raise typer.Exit(1)
