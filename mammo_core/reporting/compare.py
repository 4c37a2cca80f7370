"""Side by side of two pipeline runs: their params, their metrics and every table of their reports.

``mammo compare RUN_A RUN_B`` answers "what changed, and what did it do to the numbers?". The answer is three
long tables, one row per compared item with run A's value, run B's value, their difference (B - A, numbers
only) and a ``differs`` flag, so that the result is a plain CSV a reader can sort and filter, and a Markdown
page that shows every value. Values are compared as written (no rounding): two runs with the same seeds and
params must come out identical, and any drift shows.

Plain functions over dicts and DataFrames; the command (``flows/commands/compare_cmd.py``) fetches them from MLflow and
the stage folders.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mammo_core.reporting.report_render import format_value

COLUMNS = ("a", "b", "diff", "differs")


def flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"classify": {"n_boot": 50}}`` -> ``{"classify.n_boot": 50}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, Mapping):
            out.update(flatten(item, name))
        else:
            out[name] = item
    return out


def _number(value: Any) -> float | None:
    """The value as a float when it is one (numbers and numeric strings such as MLflow params), else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _same(a: Any, b: Any) -> bool:
    if _missing(a) and _missing(b):
        return True
    if _missing(a) or _missing(b):
        return False
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        return x == y or (math.isnan(x) and math.isnan(y))
    return str(a) == str(b)


def _diff(a: Any, b: Any) -> float:
    x, y = _number(a), _number(b)
    return y - x if x is not None and y is not None else float("nan")


def _pairs(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> pd.DataFrame:
    names = list(a) + [n for n in b if n not in a]
    rows = [{key: n, "a": a.get(n), "b": b.get(n), "diff": _diff(a.get(n), b.get(n)),
             "differs": not _same(a.get(n), b.get(n))} for n in names]
    return pd.DataFrame(rows, columns=[key, *COLUMNS])


def compare_params(a: Mapping[str, Any], b: Mapping[str, Any]) -> pd.DataFrame:
    """One row per param (nested mappings flattened to ``section.key``), sorted by name; ``differs`` flags a
    param whose value is not the same in both runs (absent in one counts as different)."""
    frame = _pairs(flatten(a), flatten(b), "param")
    frame["a"], frame["b"] = frame["a"].map(_as_text), frame["b"].map(_as_text)
    return frame.sort_values("param", kind="stable").reset_index(drop=True)


def _as_text(value: Any) -> Any:
    """Lists and mappings as JSON (``[12, 48]``), scalars unchanged, so the CSV cell reads like the YAML."""
    return value if value is None or isinstance(value, str | int | float) else json.dumps(value, default=str)


def compare_metrics(a: Mapping[str, float], b: Mapping[str, float]) -> pd.DataFrame:
    """One row per metric name in either run, sorted by name, with B - A."""
    return _pairs(dict(a), dict(b), "metric").sort_values("metric", kind="stable").reset_index(drop=True)


def _keyed_rows(frame: pd.DataFrame) -> list[tuple[str, dict[str, Any]]]:
    """(row key, {column: value}): keyed by the first column when it names each row once, else by position."""
    records = frame.to_dict(orient="records")
    if frame.shape[1] >= 2 and frame.iloc[:, 0].map(str).is_unique:
        key = frame.columns[0]
        return [(str(r[key]), {str(c): v for c, v in r.items() if c != key}) for r in records]
    return [(f"row {i}", {str(c): v for c, v in r.items()}) for i, r in enumerate(records)]


def compare_table(a: pd.DataFrame | None, b: pd.DataFrame | None) -> pd.DataFrame:
    """Every cell of a table in either run: ``row`` (the first column's value), ``column``, A, B, B - A.

    Rows are matched by their first column (a class, a classifier, a bit length), so a row present in one run
    only shows with the other side empty instead of shifting every row below it.
    """
    cells: dict[tuple[str, str], list[Any]] = {}
    for side, frame in enumerate((a, b)):
        for key, values in _keyed_rows(frame) if frame is not None else []:
            for column, value in values.items():
                cells.setdefault((key, column), [None, None])[side] = value
    rows = [{"row": r, "column": c, "a": va, "b": vb, "diff": _diff(va, vb), "differs": not _same(va, vb)}
            for (r, c), (va, vb) in cells.items()]
    return pd.DataFrame(rows, columns=["row", "column", *COLUMNS])


@dataclass
class Comparison:
    """The whole side by side of two runs (``labels``: how to name run A and run B, e.g. their run ids)."""

    labels: tuple[str, str]
    params: pd.DataFrame
    metrics: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # mammo_core.evaluation.paired_bootstrap.paired_table on the shared test split (None: not computed)
    paired: pd.DataFrame | None = None

    @property
    def changed_params(self) -> list[str]:
        return list(self.params.loc[self.params["differs"], "param"])


def compare_runs(labels: tuple[str, str], params: tuple[Mapping[str, Any], Mapping[str, Any]],
                 metrics: tuple[Mapping[str, float], Mapping[str, float]],
                 tables: tuple[Mapping[str, pd.DataFrame], Mapping[str, pd.DataFrame]]) -> Comparison:
    """Compare two runs given as (A, B) pairs of params, metrics and report tables (name -> frame)."""
    names = sorted(set(tables[0]) | set(tables[1]))
    compared = {n: compare_table(tables[0].get(n), tables[1].get(n)) for n in names}
    notes = [f"table {n} exists only in run {labels[1] if n not in tables[0] else labels[0]}" for n in names
             if (n in tables[0]) != (n in tables[1])]
    return Comparison(labels, compare_params(*params), compare_metrics(*metrics), compared, notes)


def to_frame(comparison: Comparison) -> pd.DataFrame:
    """Everything in one long table (the ``compare.csv``): kind (param, metric, table), table, row, column."""
    parts = [
        comparison.params.rename(columns={"param": "row"}).assign(kind="param", table="", column=""),
        comparison.metrics.rename(columns={"metric": "row"}).assign(kind="metric", table="", column=""),
        *(frame.assign(kind="table", table=name) for name, frame in comparison.tables.items()),
    ]
    frame = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else \
        pd.DataFrame(columns=["kind", "table", "row", "column", *COLUMNS])
    a, b = comparison.labels
    return frame[["kind", "table", "row", "column", *COLUMNS]].rename(columns={"a": f"a ({a})", "b": f"b ({b})"})


def _md(frame: pd.DataFrame, key_columns: list[str], labels: tuple[str, str]) -> list[str]:
    header = [*key_columns, f"A ({labels[0]})", f"B ({labels[1]})", "B - A", "differs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in frame.itertuples(index=False):
        values = [*(getattr(row, k) for k in key_columns), row.a, row.b, row.diff]
        cells = [format_value(v).replace("|", "\\|") for v in values] + (["**yes**"] if row.differs else [""])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(comparison: Comparison) -> str:
    """``compare.md``: changed params first, then every metric, then every report table cell by cell."""
    a, b = comparison.labels
    changed = comparison.changed_params
    out = [f"# mammo compare: A = {a}, B = {b}", "",
           "Differences are B - A. 'differs' flags a value that is not identical in both runs; a value absent "
           "from one run counts as different.", ""]
    out += ["## Params that differ", ""]
    out += _md(comparison.params[comparison.params["differs"]], ["param"], comparison.labels) if changed \
        else ["No param differs."]
    n_metrics = int(comparison.metrics["differs"].sum())
    out += ["", f"## Metrics ({len(comparison.metrics)}, {n_metrics} differ)", ""]
    out += _md(comparison.metrics, ["metric"], comparison.labels)
    for name, frame in comparison.tables.items():
        out += ["", f"## Table {name} ({len(frame)} cells, {int(frame['differs'].sum())} differ)", ""]
        out += _md(frame, ["row", "column"], comparison.labels)
    if comparison.paired is not None and len(comparison.paired):
        out += ["", "## Paired bootstrap on the shared test split", "",
                "B - A of each headline metric with its percentile interval, both runs scored on the same "
                "resamples of the test patients (from the classify stages' saved predictions and the detect "
                "stages' per-image test detections). A difference "
                "whose interval contains 0 is not distinguishable from noise.", ""]
        out += paired_lines(comparison.paired, comparison.labels)
    if comparison.notes:
        out += ["", "## Notes", "", *(f"- {n}" for n in comparison.notes)]
    out += ["", "## All params", ""]
    out += _md(comparison.params, ["param"], comparison.labels)
    return "\n".join(out) + "\n"


def paired_lines(paired: pd.DataFrame, labels: tuple[str, str]) -> list[str]:
    """Markdown rows of a paired-bootstrap table (classifier, metric, A, B, B - A, CI, verdict)."""
    header = ["classifier", "metric", f"A ({labels[0]})", f"B ({labels[1]})", "B - A", "CI", "patients", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in paired.itertuples(index=False):
        verdict = "distinguishable from noise" if row.distinguishable else "not distinguishable from noise"
        ci = f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}] ({row.confidence:.0%})"
        lines.append(f"| {row.classifier} | {row.metric} | {row.a:.4f} | {row.b:.4f} | {row.diff:+.4f} | {ci} "
                     f"| {row.n_patients} | {verdict} |")
    return lines


DETECTION_METRICS = ("map50", "lesion_ap50", "froc_1")  # AP50, class-agnostic AP50, FROC sensitivity at 1 FP/img


def detector_paired_table(a, b, n_classes: int, models: tuple[str, ...] = ("ours", "ours_nohash", "frcnn_r50"),
                          n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
                          ) -> tuple[pd.DataFrame, list[str]]:
    """Paired CIs of B - A of each detector both runs saved test detections of (``a``, ``b``: the detect
    stages' :class:`mammo_core.detection.records.SplitRecords`), images paired on their keys and patients
    resampled; rows as
    :func:`mammo_core.evaluation.paired_bootstrap.paired_table`'s (``classifier``: ``detector <name>``).
    """
    from mammo_core.detection import bootstrap, records  # torch: only when two detect stages are compared
    from mammo_core.evaluation.paired_bootstrap import NotPaired, table_row

    rows, notes = [], []
    for model in models:
        try:
            pred_a, pred_b, targets, patients = records.paired_records(a, model, b, model)
        except NotPaired as exc:
            notes.append(f"detector {model}: no paired {a.split} comparison ({exc})")
            continue
        found = bootstrap.paired_detection_differences(pred_a, pred_b, targets, n_classes, patients, n_boot=n_boot,
                                                       seed=seed, confidence=confidence)
        rows += [table_row(f"detector {model}", found[metric]) for metric in DETECTION_METRICS]
    return pd.DataFrame(rows), notes
