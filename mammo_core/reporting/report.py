"""The run report: the paper's Tables 1-8 and Figures 9-14 regenerated from the stage artifacts of one run.

The report opens with what was measured on what (data source and counts, every network's initialisation with
file and sha256, device, epochs and budget) and one verdict per comparative claim of the paper, before the
table of contents and any provenance table. Every number is read from a file in a sealed stage folder or
computed here from one (patient-bootstrap intervals of balanced accuracy and macro AUC, and the paired
bootstrap behind each verdict, from the per-patch predictions the stages save), and every section ends with
the files it read ("Source: classify/table5_classifiers.csv (key ..., sha256 ...)"), so a reader can trace any
value back to the artifact that holds it. Nothing is invented: an artifact that is missing turns into a line
that names it (a verdict it would decide reads "not tested here"), and a stage folder that was not given
(baselines, detect) says "not run" instead of showing numbers. The paper's own values appear in columns
labelled as claims (:mod:`mammo_core.reporting.paper_claims`); they are claims on another dataset.

Plain library code: reads files, returns/writes text. The ``report`` stage (``tasks/stages/report.py``) logs the
output to MLflow.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammo_core.codes import retrieval
from mammo_core.evaluation import metrics
from mammo_core.evaluation import paired_bootstrap as pb
from mammo_core.reporting import paper_claims as claims
from mammo_core.reporting import verdicts as vd
from mammo_core.reporting.report_render import Figure, Preformatted, Section, Table, format_value, write_report
from mammo_core.runtime import openmp_wait
from mammo_core.storage import h5io, stage_files
from mammo_core.storage.store import MANIFEST, file_sha256

TITLE = "mammo-fusion: run report"
BRANCHES = ("freeze1", "freeze2", "freeze3")
SPLITS = ("train", "val", "test")
CLAIM_NOTE = ("Columns marked 'paper (claim)' are the values the paper reports, transcribed from its text; they are "
              "claims, not measured in this run.")


class _Artifacts:
    """The stage folders the report reads, with their manifests (read once)."""

    def __init__(self, stage_dirs: Mapping[str, Path | str | None]):
        self.dirs = {s: (Path(p) if p is not None else None) for s, p in stage_dirs.items()}
        self._manifests: dict[str, dict[str, Any] | None] = {}

    def manifest(self, stage: str) -> dict[str, Any] | None:
        if stage not in self._manifests:
            folder = self.dirs.get(stage)
            path = folder / MANIFEST if folder is not None else None
            self._manifests[stage] = (json.loads(path.read_text(encoding="utf-8"))
                                      if path is not None and path.is_file() else None)
        return self._manifests[stage]

    def key(self, stage: str) -> str:
        manifest = self.manifest(stage) or {}
        folder = self.dirs.get(stage)
        return str(manifest.get("key") or (folder.name if folder is not None else "?"))


class _Reader:
    """Opens the artifacts of one section: each file read becomes a source line, each absent one a note."""

    def __init__(self, artifacts: _Artifacts, section: Section):
        self.art = artifacts
        self.section = section

    def path(self, stage: str, name: str, why_absent: str = "") -> Path | None:
        folder = self.art.dirs.get(stage)
        if folder is None:
            self.section.note(f"{stage}/{name}: no {stage} stage folder was given to the report", "missing")
            return None
        path = folder / name
        if not path.is_file():
            self.section.note(f"{stage}/{name} is missing (looked in {folder}){why_absent}", "missing")
            return None
        sha = file_sha256(path)
        sealed = {f.get("path"): f.get("sha256") for f in (self.art.manifest(stage) or {}).get("files", [])}
        if sealed.get(name) not in (None, sha):
            self.section.note(f"{stage}/{name} differs from the file sealed in its manifest "
                              f"(sha256 {sealed[name][:12]} sealed, {sha[:12]} now)", "warning")
        self._source(f"{stage}/{name} (key {self.art.key(stage)}, sha256 {sha[:12]})")
        return path

    def json(self, stage: str, name: str) -> Any | None:
        path = self.path(stage, name)
        return json.loads(path.read_text(encoding="utf-8")) if path is not None else None

    def csv(self, stage: str, name: str, **kwargs: Any) -> pd.DataFrame | None:
        path = self.path(stage, name)
        return pd.read_csv(path, **kwargs) if path is not None else None

    def figure(self, stage: str, name: str, caption: str) -> None:
        path = self.path(stage, name)
        if path is not None:
            self.section.add(Figure(path, f"{stage}_{name}", caption))

    def manifest(self, stage: str, what: str) -> dict[str, Any] | None:
        """The stage's manifest (metrics, params); ``what`` says which entries the section uses."""
        if self.art.dirs.get(stage) is None:
            self.section.note(f"{stage}/{MANIFEST}: no {stage} stage folder was given to the report", "missing")
            return None
        manifest = self.art.manifest(stage)
        if manifest is None:
            self.section.note(f"{stage}/{MANIFEST} is missing (looked in {self.art.dirs[stage]})", "missing")
            return None
        self._source(f"{stage}/{MANIFEST} (key {self.art.key(stage)}, {what})")
        return manifest

    def _source(self, text: str) -> None:
        if text not in self.section.sources:
            self.section.sources.append(text)


def _metric(metrics: Mapping[str, Any] | None, name: str) -> float:
    value = (metrics or {}).get(name)
    return float(value) if value is not None else float("nan")


def _per_class_split(counts: Mapping[str, Mapping[str, int]], class_order: list[str]) -> pd.DataFrame:
    """Rows: classes (plus ``total``); columns: the splits (plus ``total``)."""
    splits = [s for s in SPLITS if s in counts] + [s for s in counts if s not in SPLITS]
    classes = class_order + sorted({c for s in splits for c in counts[s]} - set(class_order))
    frame = pd.DataFrame({s: [int(counts[s].get(c, 0)) for c in classes] for s in splits}, index=classes)
    frame["total"] = frame.sum(axis=1)
    frame.loc["total"] = frame.sum(axis=0)
    frame.index.name = "class"
    return frame


def _cite_paper(section: Section, where: str) -> None:
    section.sources.append(f"{claims.SOURCE}, {where} (the paper's claims, transcribed)")


def _claims_table(name: str, rows: Mapping[str, tuple[str, ...] | str], index: str,
                  columns: tuple[str, ...], caption: str) -> Table:
    data = [(k, *((v,) if isinstance(v, str) else v)) for k, v in rows.items()]
    frame = pd.DataFrame(data, columns=[index, *columns]).astype(str)
    return Table(name, frame, caption)


# ------------------------------------------------------------------------------------------------ sections


def _run_section(art: _Artifacts, run_info: Mapping[str, Any]) -> Section:
    section = Section("Run: stages, keys, params and code version")
    code = run_info.get("code_version") or "not recorded"
    section.note(f"Code version (git commit of the run that built this report): {code}.")
    if run_info.get("report_key"):
        section.note(f"Report stage key: {run_info['report_key']}.")
    reader = _Reader(art, section)
    expected = dict(run_info.get("stage_keys") or {})
    rows, params = [], {}
    for stage in art.dirs:
        manifest = reader.manifest(stage, "key, upstream, params, mlflow_run_id")
        if manifest is None:
            continue
        rows.append({"stage": stage, "key": art.key(stage), "mlflow_run_id": manifest.get("mlflow_run_id", ""),
                     "upstream": ", ".join(f"{u}={k}" for u, k in sorted(manifest.get("upstream", {}).items()))})
        params.update(manifest.get("params", {}))
        if stage in expected and str(expected[stage]) != art.key(stage):
            section.note(f"run_info names {stage} key {expected[stage]}, but the folder read has key "
                         f"{art.key(stage)}", "warning")
        for up, key in manifest.get("upstream", {}).items():
            if art.dirs.get(up) is not None and art.manifest(up) is not None and art.key(up) != key:
                section.note(f"{stage} was computed from {up} key {key}, but this report reads {up} key "
                             f"{art.key(up)}: their numbers do not come from one chain of stages", "warning")
    if rows:
        section.add(Table("run_stages", pd.DataFrame(rows), "Stage folders read by this report"))
    if params:
        section.add(Preformatted("Params of the stages read (from their manifests)",
                                 json.dumps(params, indent=2, sort_keys=True)))
    if run_info.get("params"):
        section.add(Preformatted("Params of the run that built this report (whole params file)",
                                 json.dumps(run_info["params"], indent=2, sort_keys=True, default=str)))
    return section


def _data_section(art: _Artifacts) -> Section:
    section = Section("Data summary")
    reader = _Reader(art, section)
    report = reader.json("curate", stage_files.CURATE.report)
    classes: list[str] = []
    if report is not None:
        classes = list(report.get("classes", []))
        per_split = pd.DataFrame({
            "images": report.get("images_per_split", {}),
            "patients": report.get("patients_per_split", {}),
            "lesions": {s: sum(v.values()) for s, v in report.get("lesions_per_class_and_split", {}).items()},
        }).reindex([s for s in SPLITS if s in report.get("images_per_split", {})])
        per_split.loc["total"] = per_split.sum(axis=0)
        per_split.index.name = "split"
        section.add(Table("data_per_split", per_split, "Curated images, patients and lesions per split (split by "
                          "patient)", index=True))
        section.add(Table("data_lesions_per_class", _per_class_split(report["lesions_per_class_and_split"], classes),
                          "Curated lesions per class and split", index=True))
        reasons = report.get("quarantined_per_reason", {})
        section.note(f"Quarantined items: {report.get('quarantined', 0)}.")
        if reasons:
            frame = pd.DataFrame(sorted(reasons.items(), key=lambda kv: -kv[1]), columns=["reason", "items"])
            section.add(Table("data_quarantine", frame, "Items quarantined by curation, per reason"))
    summary = reader.json("patches", stage_files.PATCHES.summary)
    if summary is not None:
        order = list(summary.get("class_names", classes))
        section.add(Table("data_patches_per_class", _per_class_split(summary["counts"], order),
                          "Patches per class and split (NORMAL = background patches)", index=True))
        skipped = pd.Series([s.get("reason", "") for s in summary.get("skipped", [])], dtype=object)
        section.note(f"Items skipped by patch extraction: {len(skipped)}.")
        if len(skipped):
            frame = skipped.value_counts().rename_axis("reason").reset_index(name="items")
            section.add(Table("data_patches_skipped", frame, "Items skipped by patch extraction, per reason"))
    section.note(f"The paper states: {claims.DATASET_TEXT} (the full dataset; a claim, not measured here).", "claim")
    _cite_paper(section, "section 3")
    return section


PROBE_TARGETS = {"lesion_vs_normal": "lesion vs NORMAL", "task_classes": "task classes"}


def _probe_rows(probe: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for row in probe.get("rows", []):
        rows.append({"target": PROBE_TARGETS.get(str(row.get("target")), row.get("target")),
                     "method": f"probe: {row.get('model')} on {row.get('features', 'cut+intensity')} statistics",
                     "test_acc": row.get("test_acc"),
                     "ci_low": row.get("test_acc_ci_low"), "ci_high": row.get("test_acc_ci_high"),
                     "balanced_acc": row.get("balanced_acc"), "balanced_ci_low": row.get("balanced_acc_ci_low"),
                     "balanced_ci_high": row.get("balanced_acc_ci_high"),
                     "chance (balanced)": row.get("chance_balanced_acc"), "majority rate": row.get("majority_rate"),
                     "n_test": row.get("n_test"), "source": "patches/shortcut_probe.json" + (
                         f" ({row['note']})" if row.get("note") else "")})
    return rows


def _cnn_rows(art: _Artifacts, reader: _Reader) -> list[dict[str, Any]]:
    """The task-class test accuracies of the CNN models this run trained, to read beside the probe."""
    rows = []
    target = PROBE_TARGETS["task_classes"]
    fusion = _fusion_row(reader.csv("classify", stage_files.CLASSIFY.classifiers_table))
    if fusion:
        rows.append({"target": target, "method": "CNN: fused SVM+kNN+RF on hash codes", "test_acc":
                     fusion.get("test_acc"), "ci_low": fusion.get("test_acc_ci_low"),
                     "ci_high": fusion.get("test_acc_ci_high"), "balanced_acc": fusion.get("balanced_acc"),
                     "source": "classify/table5_classifiers.csv"})
    train = reader.manifest("train", "metrics train/<branch>/test_acc") or {}
    for b in BRANCHES:
        rows.append({"target": target, "method": f"CNN: {b} (own head)",
                     "test_acc": _metric(train.get("metrics"), f"train/{b}/test_acc"), "source": "train/manifest.json"})
    if _given(art, "baselines"):
        for row in (reader.json("baselines", stage_files.BASELINES.summary) or {}).get("rows", []):
            rows.append({"target": target, "method": f"CNN: {row.get('network')}", "test_acc": row.get("test_acc"),
                         "ci_low": row.get("ci_low"), "ci_high": row.get("ci_high"),
                         "balanced_acc": row.get("balanced_acc"), "source": "baselines/baselines.json"})
    return rows


def _probe_verdicts(probe: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Per target and feature set, whether some probe's balanced-accuracy interval lies wholly above chance:
    on the ``cut`` statistics that is a shortcut by construction, on ``cut+intensity`` a flag (intensity
    also carries some content; see :mod:`mammo_core.evaluation.shortcut_probe`)."""
    lines = []
    sets = sorted({str(r.get("features", "cut+intensity")) for r in probe.get("rows", [])}, key=len)
    for (key, name), features in ((t, f) for t in PROBE_TARGETS.items() for f in sets):
        rows = [r for r in probe.get("rows", []) if r.get("target") == key and r.get("balanced_acc") is not None
                and str(r.get("features", "cut+intensity")) == features]
        above = [r for r in rows if r.get("balanced_acc_ci_low") is not None
                 and r["balanced_acc_ci_low"] > r.get("chance_balanced_acc", 1.0)]
        if not rows:
            continue
        if above:
            best = ", ".join(f"{r['model']} {format_value(r['balanced_acc'])} "
                             f"[{format_value(r['balanced_acc_ci_low'])}, {format_value(r['balanced_acc_ci_high'])}]"
                             for r in above)
            why = ("part of a CNN's accuracy on it may come from how patches were cut, not from the tissue"
                   + (" (between lesion classes the crop side follows the lesion's size: real information, "
                      "but one read without looking at the tissue)" if key == "task_classes" else "")
                   if features == "cut" else "a CNN may take the same route; intensity also carries some content "
                   "(a bright mass raises a patch's spread), so read it beside the cut-only probe")
            lines.append((f"{name}, {features} statistics: the probe predicts it above chance "
                          f"({format_value(above[0]['chance_balanced_acc'])}) on test, balanced accuracy {best}: "
                          f"{why}.", "warning"))
        else:
            lines.append((f"{name}, {features} statistics: no probe's balanced-accuracy interval lies above chance "
                          f"({format_value(rows[0]['chance_balanced_acc'])}); no shortcut found by these statistics.",
                          "note"))
    return lines


def _shortcut_probe_section(art: _Artifacts) -> Section:
    """Issue 14 item 2: can trivial patch statistics do what the CNNs do? Self-contained: reads the patches
    stage's ``shortcut_probe.json`` and, for comparison, the CNN accuracies other sections show."""
    section = Section("Shortcut probe: content-blind patch statistics beside the CNNs")
    reader = _Reader(art, section)
    probe = reader.json("patches", stage_files.PATCHES.shortcut_probe)
    if probe is None:
        return section
    section.note("Probes: simple classifiers on statistics of each patch that ignore its tissue ("
                 + ", ".join(probe.get("features", [])) + "), predicting lesion vs NORMAL and the task's "
                 f"classes. Protocol: {probe.get('protocol', 'not recorded')}. A CNN whose accuracy lies inside "
                 "a probe's interval has shown nothing beyond how the patches were cut.")
    frame = pd.DataFrame(_probe_rows(probe) + _cnn_rows(art, reader))
    section.add(Table("shortcut_probe", frame, "Ours: test accuracy with its 95% patient-bootstrap interval and "
                      "balanced accuracy of the shortcut probes, and the task-class test accuracy of the CNN "
                      "models beside them (CI where their stage computed one)"))
    for text, kind in _probe_verdicts(probe):
        section.note(text, kind)
    padding = probe.get("padding") or {}
    order = {name: i for i, name in enumerate((*SPLITS, "all"))}
    rows = [{"kind": kind, "split": split, "n": values.get("n"), "mean padded share": values.get("mean"),
             "share of patches > 5% padded": values.get("share_over_5pct"), "max padded share": values.get("max")}
            for kind in sorted(padding, key=lambda k: k != "lesion")
            for split, values in sorted(padding[kind].items(), key=lambda kv: order.get(kv[0], len(order)))]
    if rows:
        section.add(Table("shortcut_probe_padding", pd.DataFrame(rows), "Ours: share of each crop outside its "
                          "image (zero padding) per patch kind and split"))
    return section


def _not_run(heading: str, stage: str, claim: Table) -> Section:
    section = Section(heading)
    section.note(f"not run: no {stage} stage folder was given to this report. No value of ours is shown.",
                 "not_run")
    section.add(claim)
    _cite_paper(section, heading.split(":")[0])
    return section


def _table2(art: _Artifacts) -> Section:
    section = Section("Table 2: fusing any two branches, test accuracy per class")
    pairs = _Reader(art, section).csv("classify", stage_files.CLASSIFY.pairs_table, index_col=0)
    if pairs is not None:
        ours = pairs.T
        ours.index.name = "class"
        section.add(Table("table2_pairwise_fusion", ours, "Ours: test accuracy per class of each branch and of "
                          "each pair (a pair averages its two branches' probabilities); empty = no test sample "
                          "of that class", index=True))
    section.add(_claims_table("table2_paper_claims", claims.TABLE2_PCT, "category",
                              tuple(f"{c} (claim) %" for c in claims.TABLE2_COLUMNS),
                              "The paper's claimed values: its categories 1-7 are not named, so no row maps to "
                              "one of our classes"))
    _cite_paper(section, "Table 2")
    return section


def _table3(art: _Artifacts) -> Section:
    section = Section("Table 3: test images wrong in only one branch")
    errors = _Reader(art, section).csv("classify", stage_files.CLASSIFY.errors_table, index_col=0)
    if errors is not None:
        errors.index.name = "class"
        section.add(Table("table3_wrong_by_one_branch", errors, "Ours: per class, test patches wrong only in "
                          "the named branch (right in the other two), and wrong in all three", index=True))
    section.add(_claims_table("table3_paper_claims", {k: tuple(map(str, v)) for k, v in claims.TABLE3_COUNTS.items()},
                              "category", tuple(f"{c} (claim)" for c in claims.TABLE3_COLUMNS),
                              "The paper's claimed counts: categories 1-7 are not named in the paper"))
    _cite_paper(section, "Table 3")
    return section


SINGLE = "freeze3"  # the single DenseNet of the paper's Tables 4 and 5 (hashing and classify stages)


def _optional_csv(reader: _Reader, stage: str, name: str) -> pd.DataFrame | None:
    """A file that older stage versions did not write: read and cited when present, None (no note) otherwise."""
    folder = reader.art.dirs.get(stage)
    return reader.csv(stage, name) if folder is not None and (folder / name).is_file() else None


def _table4_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Table 4's columns (MAP per decoder with spread, claims, paired difference) from a ``table4_map*.csv``."""
    bits = table["bits"].astype(int)
    frame = pd.DataFrame({
        "bits": bits,
        "seeds": table.get("n_seeds"),
        "hash MAP": table["hash_map"],
        "hash MAP sd": table.get("hash_map_std"),
        "paper (claim) hash MAP": [claims.TABLE4_MAP["hash"].get(b, "") for b in bits],
        "FC MAP": table["fc_map"],
        "FC MAP sd": table.get("fc_map_std"),
        "paper (claim) FC MAP": [claims.TABLE4_MAP["fc"].get(b, "") for b in bits],
        "hash - FC (paired, mean)": table.get("hash_map_minus_fc_map"),
        "hash - FC sd": table.get("hash_map_minus_fc_map_std"),
        "hash - FC min": table.get("hash_map_minus_fc_map_min"),
        "hash - FC max": table.get("hash_map_minus_fc_map_max"),
        "seeds hash > FC": table.get("hash_map_wins"),
        "hash P@10": table.get("hash_p@10"),
        "FC P@10": table.get("fc_p@10"),
    }).dropna(axis=1, how="all")
    return frame


def _table4(art: _Artifacts) -> Section:
    section = Section("Table 4: hash decoder vs fully-connected alternative, retrieval MAP by code length")
    reader = _Reader(art, section)
    table = reader.csv("hashing", stage_files.HASHING.map_table)
    if table is not None:
        frame = _table4_frame(table)
        section.add(Table("table4_map", frame, "Ours, fused features (Freeze1-3): MAP (and precision at 10) of test "
                          "queries retrieving from the training codes, per code length; MAP is the mean over the "
                          "training seeds, sd the sample standard deviation across seeds, and hash - FC the "
                          "difference taken per seed (both decoders trained with the same seed) then summarised"))
        if "n_seeds" not in table.columns:
            section.note("table4_map.csv has no per-seed summary (a hashing stage of an older version): one "
                         "training run per decoder, so the spread over seeds is unknown", "warning")
        elif int(table["n_seeds"].min()) < 3:
            section.note(f"only {int(table['n_seeds'].min())} training seed(s) per decoder (hashing.seeds): the "
                         "spread over seeds is not an estimate of the run-to-run variation", "warning")
        by_seed = reader.csv("hashing", stage_files.HASHING.map_by_seed) if "n_seeds" in table.columns else None
        if by_seed is not None:
            section.add(Table("table4_map_by_seed", by_seed, "MAP of each decoder per code length and training seed "
                              "(hash_minus_fc_map: the paired difference of that seed)"))
        single = _optional_csv(reader, "hashing", f"table4_map_{SINGLE}.csv")
        if single is not None:
            section.add(Table(f"table4_map_single_{SINGLE}", _table4_frame(single), "Ours, single DenseNet "
                              f"({SINGLE} features alone, the paper's setting for this table): the same decoders, "
                              "seeds and budget"))
        else:
            section.note(f"hashing/table4_map_{SINGLE}.csv is absent (a hashing stage of an older version): no "
                         "single-DenseNet rows", "warning")
        section.note(CLAIM_NOTE + " The project's paper notes say this table of the paper resembles the results of "
                     "Lai et al. (CVPR 2015).", "claim")
        _cite_paper(section, "Table 4")
    reader.figure("hashing", "table4_map.png", "Retrieval MAP by code length (hashing stage figure)")
    stats = reader.csv("hashing", stage_files.HASHING.bit_statistics)
    if stats is not None:
        section.add(Table("table4_bit_statistics", stats, "Bit statistics of the first seed's relaxed codes on "
                          "the test split (fraction binary, fraction outside the threshold band, bit balance, "
                          "constant bits, mean absolute correlation between bits)"))
    return section


# Interval columns computed from saved per-patch predictions (metrics_with_ci keys -> table columns).
CI_COLUMNS = {"acc_ci_low": "acc ci_low", "acc_ci_high": "acc ci_high", "balanced_acc": "balanced_acc",
              "balanced_acc_ci_low": "balanced_acc ci_low", "balanced_acc_ci_high": "balanced_acc ci_high",
              "macro_auc": "macro AUC", "macro_auc_ci_low": "macro AUC ci_low",
              "macro_auc_ci_high": "macro AUC ci_high"}


def _frame_cis(frame: pd.DataFrame, n_boot: int, class_names: list[str] | None = None) -> dict[str, float]:
    """:func:`metrics_with_ci` of one model's test predictions (columns as ``classify/predictions.csv``)."""
    names = class_names or [c[len(prefix):] for c in frame.columns for prefix in (PROBA_PREFIX, "proba_")
                            if c.startswith(prefix)]
    proba = _proba_of(frame, names) if names else None
    return metrics_with_ci(frame["label"].to_numpy(), frame["predicted"].to_numpy(), proba,
                           frame["patient_id"].astype(str).to_numpy(), n_boot)


def _prediction_cis(reader: _Reader, art: _Artifacts) -> dict[str, dict[str, float]]:
    """Classifier -> intervals from ``classify/predictions.csv`` (test rows); empty when it is absent."""
    test = _classify_test(reader)
    if test is None:
        return {}
    if not any(c.startswith(PROBA_PREFIX) for c in test.columns):
        reader.section.note("classify/predictions.csv holds no class probabilities (a classify stage of an older "
                            "version): macro AUC has no interval", "warning")
    return {str(name): _frame_cis(rows, _n_boot(art)) for name, rows in test.groupby("classifier")}


def _insert_cis(frame: pd.DataFrame, cis: list[Mapping[str, float]]) -> None:
    """Put the balanced-accuracy and macro-AUC intervals right after their point values (in place)."""
    for after, keys in (("balanced_acc", ("balanced_acc_ci_low", "balanced_acc_ci_high")),
                        ("auc_ovr_macro", ("macro_auc_ci_low", "macro_auc_ci_high"))):
        if after not in frame.columns:
            frame[after] = [c.get(after if after == "balanced_acc" else "macro_auc", np.nan) for c in cis]
        at = list(frame.columns).index(after) + 1
        for offset, key in enumerate(keys):
            frame.insert(at + offset, CI_COLUMNS[key], [c.get(key, np.nan) for c in cis])


def _table5(art: _Artifacts) -> Section:
    section = Section("Table 5: classifiers on the hash codes, with confidence intervals")
    reader = _Reader(art, section)
    manifest = reader.manifest("classify", "params classify.n_boot, classify.codes")
    table = reader.csv("classify", stage_files.CLASSIFY.classifiers_table)
    if table is not None:
        main = [c for c in ("classifier", "test_acc", "test_acc_ci_low", "test_acc_ci_high", "balanced_acc",
                            "auc_ovr_macro", "macro_f1") if c in table.columns]
        frame = table[main].copy()
        cis = _prediction_cis(reader, art)
        _insert_cis(frame, [cis.get(str(c), {}) for c in table["classifier"]])
        frame["paper (claim) accuracy %"] = [claims.TABLE5_ACCURACY_PCT.get(c, "") for c in table["classifier"]]
        if "note" in table.columns:
            frame["note"] = table["note"].fillna("")
        params = (manifest or {}).get("params", {}).get("classify", {})
        boot = f"{params['n_boot']} resamples" if "n_boot" in params else "resample count not recorded"
        section.add(Table("table5_classifiers", frame, f"Ours, fused features (Freeze1-3): test accuracy with its "
                          f"95% patient-bootstrap percentile interval ({boot}), codes {params.get('codes', '?')}"))
        single = _optional_csv(reader, "classify", f"table5_single_{SINGLE}.csv")
        if single is not None:
            cols = [c for c in ("classifier", "test_acc", "test_acc_ci_low", "test_acc_ci_high", "balanced_acc",
                                "auc_ovr_macro", "macro_f1") if c in single.columns]
            one = single[cols].copy()
            _insert_cis(one, [cis.get(f"{SINGLE}/{c}", {}) for c in single["classifier"]])
            one["paper (claim) accuracy %"] = [claims.TABLE5_ACCURACY_PCT.get(c, "") for c in single["classifier"]]
            section.add(Table(f"table5_single_{SINGLE}", one, f"Ours, single DenseNet ({SINGLE} codes alone, the "
                              "paper's setting for this table): the same classifiers and weight choice"))
        section.note(CLAIM_NOTE + " The paper's 'Ours' row is our 'fusion' row.", "claim")
        _cite_paper(section, "Table 5")
        recall = [c for c in table.columns if c.startswith("recall/")]
        if recall:
            per_class = table[["classifier", *recall]].rename(columns=lambda c: c.removeprefix("recall/"))
            section.add(Table("table5_recall_per_class", per_class, "Ours: test recall per class"))
    info = reader.json("classify", stage_files.CLASSIFY.summary)
    if info is not None and info.get("weights"):
        weights = pd.DataFrame(sorted(info["weights"].items()), columns=["classifier", "fusion weight"])
        section.add(Table("table5_fusion_weights", weights, "Soft-voting weights of the fused classifier"))
    return section


def _table7(art: _Artifacts) -> Section:
    section = Section("Table 7: frozen parameters and test accuracy per branch")
    reader = _Reader(art, section)
    config = reader.json("train", stage_files.TRAIN.model_config)
    train = reader.manifest("train", "metrics train/<branch>/test_acc")
    feats = reader.manifest("features", "metrics features/<branch|fused>/test_acc")
    counts = (config or {}).get("parameter_counts", {})
    branches = list(counts) or list(BRANCHES)
    train_metrics, feat_metrics = (train or {}).get("metrics", {}), (feats or {}).get("metrics", {})
    rows = []
    frames, _ = _branch_test(reader) if _given(art, "train") and _given(art, "patches") else ({}, [])
    cis = {b: _frame_cis(f, _n_boot(art)) for b, f in frames.items()}
    for b in branches:
        paper_params, paper_acc = claims.TABLE7.get(b, ("", ""))
        ci = cis.get(b, {})
        rows.append({"model": b, "frozen params": counts.get(b, {}).get("frozen", np.nan),
                     "trainable params": counts.get(b, {}).get("trainable", np.nan),
                     "paper (claim) frozen params": paper_params,
                     "test_acc (branch head, train stage)": _metric(train_metrics, f"train/{b}/test_acc"),
                     **{label: ci.get(key, np.nan) for key, label in CI_COLUMNS.items()},
                     "test_acc (linear probe, features stage)": _metric(feat_metrics, f"features/{b}/test_acc"),
                     "paper (claim) test accuracy %": paper_acc})
    paper_params, paper_acc = claims.TABLE7["fused"]
    rows.append({"model": "fused", "frozen params": np.nan, "trainable params": np.nan,
                 "paper (claim) frozen params": paper_params, "test_acc (branch head, train stage)": np.nan,
                 "test_acc (linear probe, features stage)": _metric(feat_metrics, "features/fused/test_acc"),
                 "paper (claim) test accuracy %": paper_acc})
    section.add(Table("table7_branches", pd.DataFrame(rows), "Ours: parameter counts of each branch, its own "
                      "classifier head's test accuracy with its 95% patient-bootstrap interval, balanced accuracy "
                      "and macro one-vs-rest AUC with theirs (from train/predictions.h5), and a linear probe's "
                      "test accuracy on its features (the fused row: the probe on the weighted fused features)"))
    section.note(CLAIM_NOTE, "claim")
    _cite_paper(section, "Table 7")
    return section


def _val_curves(history: Mapping[str, list[Mapping[str, Any]]]) -> pd.DataFrame:
    """Epoch x branch validation accuracy from ``history.json`` (entries hold one value or one per branch)."""
    columns = {}
    for branch, epochs in history.items():
        series = {}
        for entry in epochs:
            value = entry.get("val_acc")
            series[int(entry["epoch"])] = value.get(branch, np.nan) if isinstance(value, Mapping) else value
        columns[branch] = pd.Series(series, dtype=float)
    frame = pd.DataFrame(columns).sort_index()
    frame.index.name = "epoch"
    return frame


def _figure9(art: _Artifacts) -> Section:
    section = Section("Figure 9: validation accuracy of the branches and the fusion-weight search")
    reader = _Reader(art, section)
    reader.figure("train", "val_curves.png", "Validation accuracy per branch and epoch (train stage figure)")
    history = reader.json("train", stage_files.TRAIN.history)
    if history is not None:
        section.add(Table("figure9_val_acc", _val_curves(history), "Validation accuracy per epoch", index=True))
    fusion = reader.json("features", stage_files.FEATURES.fusion)
    if fusion is not None:
        weights = list(fusion.get("weights", []))
        frame = pd.DataFrame({"branch": list(BRANCHES)[: len(weights)], "weight (ours)": weights,
                              "paper (claim) weight": list(claims.FUSION_WEIGHTS)[: len(weights)]})
        section.add(Table("figure9_fusion_weights", frame, f"Chosen fusion weights (mode: {fusion.get('mode', '?')})"))
        section.note("The paper states its weights were set to [0.4, 0.4, 0.3] after testing weights on the "
                     "validation set.", "claim")
        _cite_paper(section, "section 4.6")
    if fusion is not None and fusion.get("mode") != "search":
        section.note("Fusion weights were fixed by params, so the features stage searched no grid.")
        return section
    reader.figure("features", "fusion_grid.png", "Validation accuracy of a linear probe per fusion-weight triple")
    grid = reader.csv("features", stage_files.FEATURES.fusion_grid)
    if grid is not None and "val_acc" in grid.columns:
        grid = grid.sort_values("val_acc", ascending=False, kind="stable").reset_index(drop=True)
        section.add(Table("figure9_fusion_grid", grid, "Fusion-weight grid, best first", max_rows=10))
    return section


# ------------------------------------------------------ Tables 1, 6, 8 and Figure 10 (baselines and detect stages)

# Our names -> the paper's row names (keys of paper_claims tables); a name without a paper row gets no claim.
TABLE1_PAPER_ROWS = {"sift_bovw_svm": "SIFT-BoVW", "vgg16": "VGGNet", "agnet": "AGNet", "inception_v3": "Inception",
                     "densenet121": "DenseNet", "fusion": "Our"}
TABLE6_PAPER_ROWS = {"vgg16": "VGGNet based", "inception_v3": "InceptionV3 based", "resnet50": "ResNet50 based",
                     "densenet121": "DenseNet based", "fusion": "Our"}
TABLE8_PAPER_ROWS = {"frcnn_r50": "Faster RCNN", "ours": "Ours"}
LATENCY_FILE = stage_files.CLASSIFY.latency  # classify stage: the trained chain and the single networks, one process


def _given(art: _Artifacts, stage: str) -> bool:
    return art.dirs.get(stage) is not None


def _fusion_row(table5: pd.DataFrame | None) -> Mapping[str, Any]:
    """The fused classifier's row of ``classify/table5_classifiers.csv`` (empty when absent)."""
    if table5 is None or "classifier" not in table5.columns:
        return {}
    rows = table5[table5["classifier"] == "fusion"]
    return rows.iloc[0].to_dict() if len(rows) else {}


def _table1(art: _Artifacts) -> Section:
    claim = _claims_table("table1_paper_claims", claims.TABLE1_ACCURACY_PCT, "method", ("paper (claim) accuracy %",),
                          "The paper's claimed values (not measured here)")
    if not _given(art, "baselines"):
        return _not_run("Table 1: performance of different methods", "baselines", claim)
    section = Section("Table 1: performance of different methods")
    reader = _Reader(art, section)
    base = reader.json("baselines", stage_files.BASELINES.summary) or {}
    train = reader.manifest("train", "metrics train/<branch>/test_acc") or {}
    table5 = reader.csv("classify", stage_files.CLASSIFY.classifiers_table)
    branch_frames, _ = _branch_test(reader) if _given(art, "train") and _given(art, "patches") else ({}, [])
    cis = {**{b: _frame_cis(f, _n_boot(art)) for b, f in branch_frames.items()},
           **({"fusion": _prediction_cis(reader, art).get("fusion", {})} if _given(art, "classify") else {})}
    rows = []

    def add(method: str, kind: str, source: str, row: Mapping[str, Any]) -> None:
        ci = cis.get(method, {}) if kind != "single network" else single_cis.get(method, {})
        rows.append({"method": method, "kind": kind, "test_acc": row.get("test_acc", np.nan),
                     "ci_low": row.get("ci_low", ci.get("acc_ci_low", np.nan)),
                     "ci_high": row.get("ci_high", ci.get("acc_ci_high", np.nan)),
                     "balanced_acc": ci.get("balanced_acc", row.get("balanced_acc", np.nan)),
                     "balanced_acc ci_low": ci.get("balanced_acc_ci_low", np.nan),
                     "balanced_acc ci_high": ci.get("balanced_acc_ci_high", np.nan),
                     "macro AUC": ci.get("macro_auc", row.get("macro_auc", np.nan)),
                     "macro AUC ci_low": ci.get("macro_auc_ci_low", np.nan),
                     "macro AUC ci_high": ci.get("macro_auc_ci_high", np.nan),
                     "paper row": TABLE1_PAPER_ROWS.get(method, ""),
                     "paper (claim) accuracy %": claims.TABLE1_ACCURACY_PCT.get(TABLE1_PAPER_ROWS.get(method, ""), ""),
                     "source": source})

    for row in base.get("classic", []):
        add(str(row["method"]), "classic", "baselines/baselines.json", row)
    single_cis = _baseline_cis(reader, art)
    for row in base.get("rows", []):
        add(str(row["network"]), "single network", "baselines/baselines.json", row)
    for b in BRANCHES:
        add(b, "our branch (own head)", "train/manifest.json",
            {"test_acc": _metric(train.get("metrics"), f"train/{b}/test_acc")})
    fusion = _fusion_row(table5)
    add("fusion", "ours: fused SVM+kNN+RF on hash codes", "classify/table5_classifiers.csv",
        {"test_acc": fusion.get("test_acc", np.nan), "ci_low": fusion.get("test_acc_ci_low", np.nan),
         "ci_high": fusion.get("test_acc_ci_high", np.nan), "balanced_acc": fusion.get("balanced_acc", np.nan),
         "macro_auc": fusion.get("auc_ovr_macro", np.nan)})
    section.add(Table("table1_methods", pd.DataFrame(rows), "Ours: test accuracy of the classic methods, the single "
                      "networks, our branches and our fused classifier, with balanced accuracy and macro "
                      "one-vs-rest AUC, and 95% patient-bootstrap intervals where per-patch predictions were "
                      "saved; 'paper row' names the row of the paper's Table 1 the claim is from"))
    if "majority_rate" in base:
        section.note(f"Majority-class rate on the test split: {format_value(base['majority_rate'])} "
                     "(baselines/baselines.json), the accuracy of always answering the most frequent class.")
    details = [f"{r['method']}: {r['detail']}" for r in base.get("classic", []) if r.get("detail")]
    for text in details:
        section.note(text)
    section.note(CLAIM_NOTE + " The paper gives no ResNet50 row in Table 1.", "claim")
    _cite_paper(section, "Table 1")
    return section


def _latency_rows(reader: _Reader) -> tuple[dict[str, dict[int, float]], dict[str, Any]]:
    """model -> {batch size: ms per image} from ``classify/latency.json`` (one process, all models)."""
    folder = reader.art.dirs.get("classify")
    if folder is None or not (folder / LATENCY_FILE).is_file():
        return {}, {}
    info = reader.json("classify", LATENCY_FILE) or {}
    out: dict[str, dict[int, float]] = {}
    for row in info.get("rows", []):
        name = "fusion" if row.get("model") == info.get("ours") else str(row.get("model"))
        out.setdefault(name, {})[int(row["batch_size"])] = float(row["ms_per_image"])
    return out, info


def _table6(art: _Artifacts) -> Section:
    claim = _claims_table("table6_paper_claims", claims.TABLE6, "method",
                          ("paper (claim) accuracy %", "paper (claim) time ms"),
                          "The paper's claimed values (not measured here)")
    if not _given(art, "baselines"):
        return _not_run("Table 6: single-network methods, accuracy and inference time", "baselines", claim)
    section = Section("Table 6: single-network methods, accuracy and inference time")
    reader = _Reader(art, section)
    base = reader.json("baselines", stage_files.BASELINES.summary) or {}
    timed, info = _latency_rows(reader) if _given(art, "classify") else ({}, {})
    batches = sorted({b for v in timed.values() for b in v})
    rows = []

    def add(method: str, kind: str, row: Mapping[str, Any], ci: Mapping[str, float], source: str,
            extra: Mapping[str, Any] | None = None) -> None:
        paper = claims.TABLE6.get(TABLE6_PAPER_ROWS.get(method, ""), ("", ""))
        latency = ({f"ms/image batch {b}": timed.get(method, {}).get(b, np.nan) for b in batches} if timed else
                   {"latency_ms (baselines stage, batch 1)": row.get("latency_ms", np.nan)})
        rows.append({"method": method, "kind": kind, "test_acc": row.get("test_acc", np.nan),
                     "ci_low": row.get("ci_low", np.nan), "ci_high": row.get("ci_high", np.nan),
                     "balanced_acc": ci.get("balanced_acc", row.get("balanced_acc", np.nan)),
                     "balanced_acc ci_low": ci.get("balanced_acc_ci_low", np.nan),
                     "balanced_acc ci_high": ci.get("balanced_acc_ci_high", np.nan),
                     "macro AUC": ci.get("macro_auc", row.get("macro_auc", np.nan)),
                     "macro AUC ci_low": ci.get("macro_auc_ci_low", np.nan),
                     "macro AUC ci_high": ci.get("macro_auc_ci_high", np.nan), **latency,
                     **(extra or {}),
                     "paper (claim) accuracy %": paper[0], "paper (claim) time ms": paper[1], "source": source})

    single_cis = _baseline_cis(reader, art)
    for row in base.get("rows", []):
        add(str(row["network"]), "single network", row, single_cis.get(str(row["network"]), {}),
            "baselines/baselines.json",
            {"params_m": row.get("params_m", np.nan), "input_size": row.get("input_size", np.nan),
             "epochs": row.get("epochs", np.nan), "weights": row.get("weights", ""),
             "train rows": row.get("train_rows", np.nan), "frozen layers": row.get("frozen_layers", ""),
             "frozen params": row.get("frozen_params", np.nan),
             "trainable params": row.get("trainable_params", np.nan)})
    f3_rows, f3_predictions = _freeze3_fusion(reader)
    by_name = ({str(n): f for n, f in f3_predictions.groupby("name")}
               if f3_predictions is not None and "name" in f3_predictions.columns else {})
    for row in f3_rows or []:
        name = str(row.get("name", ""))
        ci = _frame_cis(by_name[name], _n_boot(art)) if name in by_name else {}
        acc_ci = row.get("accuracy_ci") or [np.nan, np.nan]
        kind = ("Freeze3 + another network (section 4.7)" if name.lower().startswith("freeze3+") else
                "same head as the Freeze3 + X rows (section 4.7)")
        add(name, kind,
            {"test_acc": row.get("accuracy", np.nan), "ci_low": acc_ci[0], "ci_high": acc_ci[1],
             "balanced_acc": row.get("balanced_accuracy", np.nan), "macro_auc": row.get("macro_auc", np.nan)},
            ci, f"baselines/{FREEZE3_FUSION}")
    fusion = _fusion_row(reader.csv("classify", stage_files.CLASSIFY.classifiers_table))
    fusion_ci = _prediction_cis(reader, art).get("fusion", {}) if _given(art, "classify") else {}
    add("fusion", "ours: fused DenseNets + hash decoder + SVM/kNN/RF",
        {"test_acc": fusion.get("test_acc", np.nan), "ci_low": fusion.get("test_acc_ci_low", np.nan),
         "ci_high": fusion.get("test_acc_ci_high", np.nan), "balanced_acc": fusion.get("balanced_acc", np.nan),
         "macro_auc": fusion.get("auc_ovr_macro", np.nan)}, fusion_ci,
        "classify/table5_classifiers.csv" + (f", classify/{LATENCY_FILE}" if timed else ""))
    section.add(Table("table6_single_networks", pd.DataFrame(rows), "Ours: each single network trained on the "
                      "same patches, the Freeze3 + X fusions when that experiment ran, and our fused model: test "
                      "accuracy, balanced accuracy and macro one-vs-rest AUC with 95% patient-bootstrap intervals "
                      "(empty where the stage saved no per-patch predictions), and inference time per image"))
    if timed:
        section.note(f"Times: classify/{LATENCY_FILE}, every model timed in one process on {info.get('device', '?')}"
                     f" at batch sizes {batches} (median of {info.get('repeats', '?')} interleaved calls per model "
                     "and batch). The fusion row times the trained chain that produced its accuracy (the train "
                     "stage's weights, the hash decoder and the fused SVM/kNN/RF, loaded as served); the single "
                     "networks are builds of the same architectures, whose cost does not depend on the weights.")
    else:
        section.note(f"classify/{LATENCY_FILE} is missing: the fused model's time was not measured, and the single "
                     "networks' times are the baselines stage's own (batch 1), not measured beside it.", "missing")
    if base.get("rows") and not single_cis:
        section.note("The baselines stage saves no per-patch predictions of the single networks: their balanced "
                     "accuracy has no interval and their macro AUC is not available.")
    section.note(CLAIM_NOTE, "claim")
    _cite_paper(section, "Table 6")
    return section


def _detection_ci(interval: dict | None) -> str:
    """'[low, high]' of a detection.json ci95 entry ('' when absent or undefined)."""
    if not interval or interval.get("low") is None or interval.get("high") is None:
        return ""
    return f"[{interval['low']:.3f}, {interval['high']:.3f}]"


def _table8_evidence_row(row: dict) -> dict:
    """A detector's intervals, initialisation (source, file, sha256) and parameter counts from detection.json."""
    ci, init, counts = row.get("ci95") or {}, row.get("initialisation") or {}, row.get("parameters") or {}
    return {"model": str(row["model"]), "mAP@0.5": row.get("map50", np.nan),
            "mAP@0.5 95% CI": _detection_ci(ci.get("map50")), "lesion AP@0.5": row.get("lesion_ap50", np.nan),
            "lesion AP@0.5 95% CI": _detection_ci(ci.get("lesion_ap50")),
            **{f"FROC @{fp} FP/img 95% CI": _detection_ci(ci.get(f"froc_{fp}")) for fp in ("0.5", "1", "2")},
            "initialisation": init.get("source", ""), "weights file": init.get("file") or "",
            "sha256": init.get("sha256") or "", "trainable params": counts.get("trainable", np.nan),
            "frozen params": counts.get("frozen", np.nan)}


def _table8(art: _Artifacts) -> Section:
    claim = _claims_table("table8_paper_claims", claims.TABLE8, "model",
                          ("paper (claim) mAP %", "paper (claim) time ms"),
                          "The paper's claimed values (not measured here)")
    if not _given(art, "detect"):
        return _not_run("Table 8: detection, mAP and time", "detect", claim)
    section = Section("Table 8: detection, mAP and time")
    reader = _Reader(art, section)
    det = reader.json("detect", stage_files.DETECT.summary) or {}
    rows, per_class = [], {}
    for row in det.get("rows", []):
        model = str(row["model"])
        paper = claims.TABLE8.get(TABLE8_PAPER_ROWS.get(model, ""), ("", ""))
        froc = row.get("froc") or {}
        rows.append({"model": model, "mAP@0.5": row.get("map50", np.nan), "mAP@[.5:.95]": row.get("map", np.nan),
                     "AR@100": row.get("ar100", np.nan), "lesion AP@0.5 (any class)": row.get("lesion_ap50", np.nan),
                     **{f"FROC sens @{fp} FP/img": froc.get(fp, np.nan) for fp in ("0.5", "1", "2")},
                     "latency_ms": row.get("latency_ms", np.nan), "params_m": row.get("params_m", np.nan),
                     "epochs": row.get("epochs", np.nan), "weights": row.get("weights", ""),
                     "paper (claim) mAP %": paper[0], "paper (claim) time ms": paper[1]})
        per_class[model] = row.get("per_class_ap50") or {}
    if rows:
        section.add(Table("table8_detection", pd.DataFrame(rows), f"Ours: detection on the test images (input long "
                          f"side {det.get('input_size', '?')} px): COCO mAP at IoU 0.5 and 0.5:0.95, recall at 100, "
                          "FROC sensitivity, per-image latency"))
    evidence = [_table8_evidence_row(row) for row in det.get("rows", []) if row.get("ci95") or row.get("parameters")]
    if evidence:
        boot = det.get("bootstrap") or {}
        section.add(Table("table8_intervals", pd.DataFrame(evidence), "Ours: 95% bootstrap intervals over the test "
                          f"images ({boot.get('unit', 'images')}, {boot.get('n_boot', '?')} resamples, computed from "
                          f"the stage's per-image detections {', '.join(boot.get('source', []))}), each detector's "
                          "initialisation and its trainable / frozen parameter counts"))
    paired = [{"comparison": pair, "metric": metric, "B - A": d.get("diff", np.nan), "A": d.get("a", np.nan),
               "B": d.get("b", np.nan), "95% CI": _detection_ci(d), "patients": d.get("n_patients", np.nan),
               "verdict": vd.NOISE if not d.get("distinguishable") else
               (vd.REPRODUCED if (d.get("low") or 0) > 0 else vd.CONTRADICTED)}
              for pair, by_metric in (det.get("paired_test") or {}).items() for metric, d in by_metric.items()]
    if paired:
        section.add(Table("table8_paired", pd.DataFrame(paired), "Ours: paired bootstrap of ours - each other "
                          "detector over the test patients (both detectors scored on the same resample of patients, "
                          f"{(det.get('bootstrap') or {}).get('n_boot', '?')} resamples; detection.json paired_test, "
                          "from the per-image test detections); 'reproduced' reads 'ours is better beyond noise'"))
    training = det.get("training") or {}
    if training:
        section.note("Training regime of every row (detection.json training): " + ", ".join(
            f"{k} {v}" for k, v in sorted(training.items())) + ". 'lesion AP@0.5 (any class)' counts a box that "
            "finds a lesion whatever class it names: it separates finding lesions from naming them.", "setup")
    fast = det.get("fast_rcnn")
    paper = claims.TABLE8["Fast RCNN"]
    section.note(f"Fast R-CNN (paper claim: mAP {paper[0]} %, {paper[1]} ms) has no row of ours; the detect stage "
                 f"records why: {fast or 'no reason recorded'}", "not_run")
    if per_class:
        classes = list(det.get("classes") or sorted({c for v in per_class.values() for c in v}))
        frame = pd.DataFrame({m: [v.get(c, np.nan) for c in classes] for m, v in per_class.items()},
                             index=pd.Index(classes, name="class"))
        section.add(Table("table8_per_class_ap50", frame, "Ours: AP at IoU 0.5 per class", index=True))
    if det.get("lesion_sizes"):
        section.add(Preformatted("Lesion sizes of the test boxes (detection.json lesion_sizes)",
                                 json.dumps(det["lesion_sizes"], indent=2, sort_keys=True)))
    dropped = det.get("dropped_boxes") or {}
    if dropped:
        frame = pd.DataFrame(sorted(dropped.items(), key=lambda kv: -kv[1]), columns=["reason", "boxes"])
        section.add(Table("table8_dropped_boxes", frame, "Ground-truth boxes dropped before detection, per reason"))
    if (art.dirs["detect"] / "lesion_sizes.png").is_file():  # optional figure of the detect stage
        reader.figure("detect", "lesion_sizes.png", "Sizes of the test lesions at the detector's input scale")
    for png in sorted(p.name for p in art.dirs["detect"].glob("examples_*.png")):
        label = png.removesuffix(".png").removeprefix("examples_")
        reader.figure("detect", png, f"Detections on test images ({label}): predicted and true boxes")
    section.note(CLAIM_NOTE + " Our mAP values are fractions; the paper's are percentages.", "claim")
    _cite_paper(section, "Table 8")
    return section



def _figure10(art: _Artifacts) -> Section:
    if not _given(art, "baselines"):
        section = Section("Figure 10: validation accuracy of other backbones")
        section.note("not run: no baselines stage folder was given to this report.", "not_run")
        return section
    section = Section("Figure 10: validation accuracy of other backbones")
    reader = _Reader(art, section)
    reader.figure("baselines", "figure10_val_curves.png", "Validation accuracy per epoch of each single network "
                  "(baselines stage figure)")
    curves = reader.json("baselines", stage_files.BASELINES.curves)
    if curves is not None:
        section.add(Table("figure10_val_acc", _val_curves(curves), "Validation accuracy per epoch and network",
                          index=True))
    return section


def _confusion(art: _Artifacts, heading: str, branch: str) -> Section:
    section = Section(heading)
    reader = _Reader(art, section)
    reader.figure("train", f"confusion_{branch}.png", f"{branch}: test confusion matrix (train stage figure)")
    path = reader.path("train", f"confusion_{branch}.csv")
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline().strip()
        names = [n.strip() for n in first.lstrip("#").split(",")] if first.startswith("#") else None
        matrix = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.int64, comments="#")
        names = names if names and len(names) == matrix.shape[1] else [str(i) for i in range(matrix.shape[1])]
        frame = pd.DataFrame(matrix, index=pd.Index(names, name="true \\ predicted"), columns=names)
        section.add(Table(f"confusion_{branch}", frame, "Rows: true class; columns: predicted class (test patches)",
                          index=True))
    return section


def _figure14(art: _Artifacts) -> Section:
    section = Section("Figure 14: confusion matrix of the fused classifier")
    _Reader(art, section).figure("classify", "confusion_fusion.png",
                                 "Fused SVM+kNN+RF classifier: test confusion matrix (classify stage figure)")
    section.note(f"The paper states that {claims.FIGURE14_TEXT} (a claim). Our per-class recall is in Table 5.",
                 "claim")
    _cite_paper(section, "section 4.7")
    return section


# ------------------------------------------------- per-patch predictions: CIs and paired verdicts (item 6)

N_BOOT_DEFAULT = 1000
PAIRED_N_BOOT = 2000
FREEZE3_FUSION = stage_files.BASELINES.freeze3_fusion
FREEZE3_FUSION_PREDICTIONS = stage_files.BASELINES.freeze3_fusion_predictions
# the single networks' test predictions, when the baselines stage saves them
BASELINE_PREDICTIONS = stage_files.BASELINES.predictions
THREE_BRANCH = "Freeze1+Freeze2+Freeze3"  # the baselines stage's three-branch row under the Freeze3 + X head
PROBA_PREFIX = "proba/"
_ID_COLUMNS = {"source_id": ("source_id", "patch_id"), "patient_id": ("patient_id",),
               "label": ("label", "y_true"), "predicted": ("predicted", "y_pred"),
               "name": ("name", "model", "method", "network")}


def _n_boot(art: _Artifacts) -> int:
    params = (art.manifest("classify") or {}).get("params", {}).get("classify", {})
    return int(params.get("n_boot", N_BOOT_DEFAULT)) or N_BOOT_DEFAULT


def _proba_of(frame: pd.DataFrame, class_names: list[str]) -> np.ndarray | None:
    """Per-class probability columns (``proba/<class>``, ``proba_<class>`` or ``p_<index>``) in class order."""
    for pattern in ("proba/{c}", "proba_{c}", "proba/{i}", "proba_{i}", "p_{i}"):
        columns = [pattern.format(c=c, i=i) for i, c in enumerate(class_names)]
        if all(c in frame.columns for c in columns):
            return frame[columns].to_numpy(dtype=np.float64)
    return None


def metrics_with_ci(y: np.ndarray, pred: np.ndarray, proba: np.ndarray | None, groups: np.ndarray,
                    n_boot: int, seed: int = 0) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro one-vs-rest AUC with 95% patient-bootstrap intervals.

    Why beside accuracy: NORMAL is about half of the test patches, so a NORMAL-heavy predictor looks good on
    accuracy alone; balanced accuracy and macro AUC weigh every class alike. AUC needs probabilities: NaN
    when the predictions file holds none.
    """
    out: dict[str, float] = {}
    measures = [("acc", metrics.ACCURACY), ("balanced_acc", metrics.BALANCED_ACCURACY)]
    if proba is not None:
        measures.append(("macro_auc", metrics.AUC_OVR_MACRO))
    for name, fn in measures:
        out[name] = fn(y, pred, proba)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = metrics.bootstrap_ci(fn, y, pred, proba, groups,
                                                                            n_boot=n_boot, seed=seed)
    for name in ("macro_auc", "macro_auc_ci_low", "macro_auc_ci_high"):
        out.setdefault(name, float("nan"))
    return out


def _standard_columns(frame: pd.DataFrame) -> pd.DataFrame | None:
    """A predictions table with our column names (``source_id``, ``patient_id``, ``label``, ``predicted``)."""
    renamed = {}
    for ours, names in _ID_COLUMNS.items():
        found = next((n for n in names if n in frame.columns), None)
        if found is None and ours != "name":
            return None
        if found is not None:
            renamed[found] = ours
    return frame.rename(columns=renamed)


def _classify_test(reader: _Reader) -> pd.DataFrame | None:
    frame = reader.csv("classify", stage_files.CLASSIFY.predictions)
    if frame is None:
        return None
    return frame[frame["split"] == "test"].reset_index(drop=True)


def _branch_test(reader: _Reader) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Each branch head's test predictions from the train stage, with the patches' ids (same row order)."""
    path = reader.path("train", stage_files.TRAIN.predictions)
    patches = reader.path("patches", stage_files.PATCHES.patches)
    if path is None or patches is None:
        return {}, []
    with h5io.open_for_reading(path) as fh:
        class_names = list(json.loads(fh.attrs["class_names"]))
        labels = fh["test/labels"][:]
        per_branch = {b: (fh[f"test/{b}/predictions"][:], fh[f"test/{b}/probabilities"][:])
                      for b in BRANCHES if f"test/{b}/predictions" in fh}
    columns = h5io.read_datasets(patches, ["split", "source_id", "patient_id", "labels"])
    codes = h5io.read_attrs(patches).get("split_codes") or {"test": 2}
    test = columns["split"] == int(codes["test"])
    ids = np.array([s.decode() if isinstance(s, bytes) else str(s) for s in columns["source_id"][test]])
    patients = np.array([s.decode() if isinstance(s, bytes) else str(s) for s in columns["patient_id"][test]])
    if len(ids) != len(labels) or not np.array_equal(columns["labels"][test], labels):
        reader.section.note("train/predictions.h5 and patches/patches.h5 disagree on the test rows; the branches' "
                            "per-patch predictions are not used", "warning")
        return {}, class_names
    frames = {}
    for b, (pred, proba) in per_branch.items():
        frame = pd.DataFrame({"split": "test", "source_id": ids, "patient_id": patients, "label": labels,
                              "predicted": pred})
        for i, c in enumerate(class_names):
            frame[f"{PROBA_PREFIX}{c}"] = proba[:, i]
        frames[b] = frame
    return frames, class_names


def _paired(better: pd.DataFrame | None, worse: pd.DataFrame | None, metric: str = "accuracy"
            ) -> tuple[pb.PairedDifference | None, str]:
    """Paired bootstrap of better - worse on the test patches both predicted; (None, why) when not paired."""
    if better is None or worse is None:
        return None, "predictions missing"
    a, b = worse.assign(split="test", classifier="x"), better.assign(split="test", classifier="x")
    try:
        pairs = pb.paired_predictions(a, b, "test", "x")
    except pb.NotPaired as exc:
        return None, str(exc)
    return pb.paired_difference(pairs, metric, n_boot=PAIRED_N_BOOT, seed=0), ""


def _comparison(better_name: str, worse_name: str, better: pd.DataFrame | None, worse: pd.DataFrame | None,
                source: str) -> vd.Comparison:
    diff, why = _paired(better, worse)
    return vd.Comparison(better_name, worse_name, "accuracy", diff, source if diff is not None else
                         f"not tested: {why}")


def _classifier_rows(test: pd.DataFrame | None, name: str) -> pd.DataFrame | None:
    if test is None:
        return None
    rows = test[test["classifier"] == name]
    return rows.reset_index(drop=True) if len(rows) else None


def _hash_vs_fc(reader: _Reader) -> list[vd.Comparison]:
    """Per code length: paired CI of mean AP (hash - FC) on the first seed's codes, resampling test patients.

    On the fused codes and, when the hashing stage wrote them, on the single DenseNet's (``freeze3/``).
    """
    path = reader.path("hashing", stage_files.HASHING.codes)
    if path is None:
        return [vd.Comparison("hash", "FC", "MAP", None, "not tested: hashing/codes.h5 missing")]
    out = []
    with h5io.open_for_reading(path) as fh:
        labels = {s: fh[f"labels/{s}"][:] for s in ("train", "test")}
        patients = np.array([p.decode() if isinstance(p, bytes) else str(p) for p in fh["patient_id/test"][:]])
        for prefix, label in (("", "fused"), (f"{SINGLE}/", f"single {SINGLE}")):
            group = fh.get(f"{prefix}hash")
            for q in sorted(int(b) for b in group) if group is not None else []:
                if f"{prefix}fc/{q}/test" not in fh:
                    out.append(vd.Comparison(f"hash@{q}", f"FC@{q}", f"MAP ({label})", None,
                                             "not tested: no FC codes"))
                    continue
                ap = {kind: retrieval.average_precisions(fh[f"{prefix}{kind}/{q}/test"][:], labels["test"],
                                                         fh[f"{prefix}{kind}/{q}/train"][:], labels["train"])
                      for kind in ("hash", "fc")}
                diff = pb.paired_mean_difference(ap["fc"], ap["hash"], patients, f"MAP@{q}", n_boot=PAIRED_N_BOOT)
                out.append(vd.Comparison(f"hash@{q}", f"FC@{q}", f"MAP ({label}, first seed's codes)", diff,
                                         f"hashing/codes.h5 {prefix}<hash|fc>/{q} (test queries vs training "
                                         "database)"))
    return out or [vd.Comparison("hash", "FC", "MAP", None, "not tested: hashing/codes.h5 holds no codes")]


def _baseline_cis(reader: _Reader, art: _Artifacts) -> dict[str, dict[str, float]]:
    """Network -> intervals from the baselines stage's per-patch test predictions, when it saves them.

    ``baselines/predictions.csv``: one row per (network, test patch), columns as
    ``freeze3_fusion_predictions.csv`` (name, patch id, patient id, y_true, y_pred, proba_<class>).
    """
    frame = _optional_csv(reader, "baselines", BASELINE_PREDICTIONS)
    frame = _standard_columns(frame) if frame is not None else None
    if frame is None or "name" not in frame.columns:
        return {}
    return {str(name): _frame_cis(rows, _n_boot(art)) for name, rows in frame.groupby("name")}


def _freeze3_fusion(reader: _Reader) -> tuple[list[dict[str, Any]] | None, pd.DataFrame | None]:
    """The baselines stage's Freeze3 + X rows and their per-patch predictions, when that experiment ran."""
    folder = reader.art.dirs.get("baselines")
    if folder is None or not (folder / FREEZE3_FUSION).is_file():
        return None, None
    rows = reader.json("baselines", FREEZE3_FUSION)
    predictions = None
    if (folder / FREEZE3_FUSION_PREDICTIONS).is_file():
        raw = reader.csv("baselines", FREEZE3_FUSION_PREDICTIONS)
        predictions = _standard_columns(raw) if raw is not None else None
        if predictions is None:
            reader.section.note(f"baselines/{FREEZE3_FUSION_PREDICTIONS} lacks a patch id, patient id, label or "
                                "prediction column; its rows are not paired", "warning")
    return list(rows if isinstance(rows, list) else (rows or {}).get("rows", [])), predictions


def _freeze3_comparisons(reader: _Reader, fusion: pd.DataFrame | None) -> tuple[list[vd.Comparison], str]:
    rows, predictions = _freeze3_fusion(reader)
    if rows is None:
        return [], (f"not tested here: the baselines stage wrote no {FREEZE3_FUSION} (the Freeze3 + VGG16 / "
                    "InceptionV3 / ResNet50 experiment of section 4.7 did not run)")
    names = [str(r.get("name", "")) for r in rows if str(r.get("name", "")).lower().startswith("freeze3+")]
    by_name = ({str(n): f.reset_index(drop=True) for n, f in predictions.groupby("name")}
               if predictions is not None and "name" in predictions.columns else {})
    three = THREE_BRANCH if THREE_BRANCH in by_name else None
    reference, ref_name, note = (by_name[three], three, "same head as the Freeze3 + X rows") if three else \
        (fusion, "fusion (ours: hash codes + SVM/kNN/RF)", "our end-to-end fused classifier; the Freeze3 + X "
         "rows have the baselines stage's head")
    comparisons = []
    for name in names:
        mine = by_name.get(name)
        if mine is None:
            comparisons.append(vd.Comparison(ref_name, name, "accuracy", None,
                                             f"not tested: no per-patch predictions of {name} in "
                                             f"baselines/{FREEZE3_FUSION_PREDICTIONS}"))
            continue
        comparisons.append(_comparison(ref_name, name, reference, mine,
                                       f"baselines/{FREEZE3_FUSION_PREDICTIONS} ({note})"))
    return comparisons, "" if comparisons else f"not tested here: baselines/{FREEZE3_FUSION} has no Freeze3+X row"


def _ci_of(row: Mapping[str, Any], metric: str) -> tuple[float, float] | None:
    """A detection row's interval of ``metric``: ``ci95: {metric: {low, high}}`` (detect stage) or flat keys."""
    nested = (row.get("ci95") or {}).get(metric)
    if isinstance(nested, Mapping) and nested.get("low") is not None and nested.get("high") is not None:
        return float(nested["low"]), float(nested["high"])
    ci = row.get(f"{metric}_ci")
    if isinstance(ci, list | tuple) and len(ci) == 2:
        return float(ci[0]), float(ci[1])
    low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    return (float(low), float(high)) if low is not None and high is not None else None


def _detector_claim(reader: _Reader) -> vd.Claim:
    text = "our detector is faster and more accurate than Faster R-CNN"
    if reader.art.dirs.get("detect") is None:
        return vd.Claim(text, "Table 8", [], note="not tested here: no detect stage folder was given")
    det = reader.json("detect", stage_files.DETECT.summary) or {}
    rows = {str(r.get("model")): r for r in det.get("rows", [])}
    ours, r50 = rows.get("ours"), rows.get("frcnn_r50")
    if ours is None or r50 is None:
        return vd.Claim(text, "Table 8", [], note="not tested here: detection.json lacks the ours or frcnn_r50 row")
    nan = float("nan")
    paired = _detector_paired(reader, len(det.get("classes") or []))
    if paired is not None:  # paired over test patients, recomputed from the saved per-image detections
        parts = [vd.Comparison("ours", "frcnn_r50", label, paired[metric], f"detect/{', '.join(DETECT_TEST_FILES)} "
                               f"(paired bootstrap over test patients, {PAIRED_N_BOOT} resamples)")
                 for metric, label in DETECTOR_CLAIM_METRICS]
    else:  # a detect folder of an older version: the unpaired intervals of detection.json
        parts = [vd.interval_comparison("ours", "frcnn_r50", "mAP@0.5", float(ours.get("map50", nan)),
                                        float(r50.get("map50", nan)), _ci_of(ours, "map50"), _ci_of(r50, "map50"),
                                        "detect/detection.json (bootstrap intervals over test images, unpaired)")]
    ratio = det.get("latency_ratio_vs_r50")
    on_cpu = str(det.get("device", "cpu")).startswith("cpu")  # threads and OpenMP waits move CPU figures only
    conditions = [f"ratio ours / frcnn_r50 {ratio:.2f}" if ratio is not None else "",
                  f"{det['latency_threads']} threads" if on_cpu and det.get("latency_threads") else "",
                  openmp_wait.describe(det["latency_omp_wait"]) if on_cpu and det.get("latency_omp_wait") else "",
                  (f"ours on {ours['latency_branch_workers']} one-thread workers"  # worker_pool: bands, task graph
                   if on_cpu and (ours.get("latency_branch_workers") or 0) >= 2 else ""),
                  (f"on 1 thread {det['latency_ratio_vs_r50_1_thread']:.2f}"
                   if on_cpu and det.get("latency_ratio_vs_r50_1_thread") else "")]
    parts.append(vd.speed_comparison("ours", "frcnn_r50", float(ours.get("latency_ms", nan)),
                                     float(r50.get("latency_ms", nan)),
                                     "detect/detection.json latency_ms (measured side by side in one process"
                                     + "".join(f", {c}" for c in conditions if c) + ")"))
    return vd.Claim(text, "Table 8", parts)


DETECT_TEST_FILES = stage_files.DETECT.split_files("test")
DETECTOR_CLAIM_METRICS = (("map50", "mAP@0.5"), ("lesion_ap50", "lesion AP@0.5 (any class)"),
                          ("froc_1", "FROC sensitivity @1 FP/img"))


def _detector_paired(reader: _Reader, n_classes: int) -> dict[str, pb.PairedDifference] | None:
    """ours - frcnn_r50 of each detection metric, paired over the test patients (None without the tables)."""
    from mammo_core.detection import bootstrap as detection_bootstrap  # torch: only when a detect folder is read
    from mammo_core.detection import records

    paths = [reader.path("detect", name, " (a detect stage of an older version: the verdict falls back to its "
                         "unpaired intervals)") for name in DETECT_TEST_FILES]
    if any(p is None for p in paths) or n_classes == 0:
        return None
    try:
        saved = records.read_split(paths[0].parent, "test", ["ours", "frcnn_r50"])
    except (ValueError, KeyError) as exc:
        reader.section.note(f"detect test detections unreadable ({exc}): the detector verdict is unpaired", "warning")
        return None
    return detection_bootstrap.paired_detection_differences(
        saved.predictions["frcnn_r50"], saved.predictions["ours"], saved.targets, n_classes, saved.groups,
        n_boot=PAIRED_N_BOOT, seed=0)


def measured_claims(art: _Artifacts, section: Section) -> list[vd.Claim]:
    """The paper's comparative claims, each tested on this run's saved predictions."""
    reader = _Reader(art, section)
    test = _classify_test(reader) if _given(art, "classify") else None
    fusion = _classifier_rows(test, "fusion")
    branches, _ = _branch_test(reader) if _given(art, "train") and _given(art, "patches") else ({}, [])
    src_fb = "classify/predictions.csv, train/predictions.h5 (test patches, paired by patch id)"
    claims_out = [
        vd.Claim("fusion beats every branch", "Table 7, section 4.6",
                 [_comparison("fusion", b, fusion, branches.get(b), src_fb) for b in BRANCHES]),
        vd.Claim("Freeze1 > Freeze2 > Freeze3", "Table 7",
                 [_comparison("freeze1", "freeze2", branches.get("freeze1"), branches.get("freeze2"),
                              "train/predictions.h5"),
                  _comparison("freeze2", "freeze3", branches.get("freeze2"), branches.get("freeze3"),
                              "train/predictions.h5")]),
        vd.Claim("divide-and-encode beats FC at every q", "Table 4",
                 _hash_vs_fc(reader) if _given(art, "hashing") else
                 [vd.Comparison("hash", "FC", "MAP", None, "not tested: no hashing stage folder")]),
        vd.Claim("classifier fusion beats each classifier", "Table 5",
                 [_comparison(f"{prefix}fusion", f"{prefix}{c}", _classifier_rows(test, f"{prefix}fusion"),
                              _classifier_rows(test, f"{prefix}{c}"), "classify/predictions.csv")
                  for prefix in ("", f"{SINGLE}/") for c in ("svm", "knn", "rf")
                  if not prefix or _classifier_rows(test, f"{prefix}fusion") is not None]),
    ]
    three, why = _freeze3_comparisons(reader, fusion) if _given(art, "baselines") else \
        ([], "not tested here: no baselines stage folder was given")
    claims_out.append(vd.Claim("three-branch fusion beats Freeze3 + another network", "section 4.7", three,
                               note=why))
    claims_out.append(_detector_claim(reader))
    return claims_out


def _verdicts(art: _Artifacts) -> Section:
    section = Section("Verdicts: the paper's comparative claims, tested on this run", lead=True)
    found = measured_claims(art, section)
    summary = pd.DataFrame([{"paper claim": c.text, "paper": c.where, "verdict": c.verdict} for c in found])
    section.add(Table("verdicts_summary", summary, "One verdict per claim: reproduced (the paired 95% interval of "
                      "the claimed winner minus the other lies above 0 for every part), contradicted (below 0 for "
                      "some part), not distinguishable from noise, or not tested here (an artifact is missing)"))
    section.add(Table("verdicts", vd.verdict_table(found), "Each part: our two values, their difference and "
                      f"its paired bootstrap interval over test patients ({PAIRED_N_BOOT} resamples, both "
                      "models scored on the same resample); 'from' names the artifacts"))
    section.note("The paper's numbers are claims on its own CBIS-DDSM split; these verdicts say only what this "
                 "run's data and budget show.", "claim")
    return section


def _header(art: _Artifacts, run_info: Mapping[str, Any]) -> Section:
    """What was measured on what: data source and counts, initialisations, device, epochs and budget."""
    section = Section("What this report measured, and on what", lead=True)
    reader = _Reader(art, section)
    params = dict(run_info.get("params") or {})
    for stage in art.dirs:
        if art.dirs.get(stage) is not None:
            params = {**(art.manifest(stage) or {}).get("params", {}), **params}
    source = (params.get("data") or {}).get("source", "not recorded")
    kind = {"phantom": "the phantom twin (synthetic mammograms generated by this project, not patient data)"}.get(
        source, f"CBIS-DDSM ({source})" if str(source).startswith("cbis") else str(source))
    curation = reader.json("curate", stage_files.CURATE.report) if _given(art, "curate") else None
    summary = reader.json("patches", stage_files.PATCHES.summary) if _given(art, "patches") else None
    counts = []
    if curation is not None:
        images, patients = curation.get("images_per_split", {}), curation.get("patients_per_split", {})
        lesions = sum(sum(v.values()) for v in curation.get("lesions_per_class_and_split", {}).values())
        counts.append(f"{sum(images.values())} images of {sum(patients.values())} patients, {lesions} lesions "
                      f"(split by patient: " + ", ".join(f"{s} {patients.get(s, 0)} patients / {images.get(s, 0)} "
                                                        "images" for s in SPLITS if s in images) + ")")
    if summary is not None:
        per_split = {s: sum(v.values()) for s, v in summary.get("counts", {}).items()}
        normal = sum(v.get("NORMAL", 0) for v in summary.get("counts", {}).values())
        counts.append(f"{sum(per_split.values())} patches (" + ", ".join(f"{s} {per_split[s]}" for s in SPLITS
                                                                      if s in per_split) +
                      f"; {normal} NORMAL)")
    section.note(f"Data: {kind}" + (": " + "; ".join(counts) if counts else "") + ".")
    init = list(run_info.get("initialisation") or [])
    if init:
        section.add(Table("header_initialisation", pd.DataFrame(init), "Initialisation of every network (a "
                          "file and its sha256 when weights were loaded; random otherwise)"))
    else:
        section.note("Initialisation of the networks: not recorded by the run that built this report.", "missing")
    run, train = params.get("run") or {}, params.get("train") or {}
    device = run.get("device", "not recorded")
    det = reader.json("detect", stage_files.DETECT.summary) if _given(art, "detect") else None
    if det and det.get("device"):
        device = f"{device} (params run.device); the detect stage ran on {det['device']}"
    section.note(f"Device: {device}. Latency (Table 6) is timed on the CPU in the classify stage.")
    budget = []
    if train:
        budget.append(f"branches (train): {train.get('epochs', '?')} epochs, batch {train.get('batch_size', '?')}, "
                      f"lr {train.get('lr', '?')} stepped every {train.get('lr_step', '?')} epochs, warm-up "
                      f"{train.get('warmup_epochs', '?')}")
    protocol = ((reader.json("baselines", stage_files.BASELINES.summary) or {}).get("protocol") or {}
                if _given(art, "baselines") else {})
    if protocol:  # the baselines take the branches' schedule (train:), so their budget is read from their output
        schedule = protocol.get("schedule") or {}
        budget.append(f"single networks (baselines): {protocol.get('epochs', '?')} epochs, batch "
                      f"{schedule.get('batch_size', '?')}, {protocol.get('train_rows', '?')} training rows (the "
                      f"{protocol.get('schedule_from', '?')} section's schedule)")
    hashing = params.get("hashing") or {}
    if hashing:
        budget.append(f"hash decoders: {hashing.get('epochs', '?')} epochs x {hashing.get('seeds', 1)} seed(s), "
                      f"bits {hashing.get('bits', '?')}")
    detect = params.get("detect") or {}
    if detect:
        budget.append(f"detectors: {detect.get('epochs', '?')} epochs, at most {detect.get('max_images') or 'all'} "
                      "images per split")
    section.note("Epochs and budget: " + ("; ".join(budget) if budget else "not recorded") + ".")
    section.note("Numbers in columns marked 'paper (claim)' are the paper's claims on another dataset (its "
                 "CBIS-DDSM split and preprocessing); they were not measured here and cannot be compared "
                 "number for number with ours.", "claim")
    return section


SECTIONS: tuple[tuple[str, Callable[[_Artifacts], Section]], ...] = (
    ("Data summary", _data_section),
    ("Shortcut probe", _shortcut_probe_section),
    ("Table 1", _table1),
    ("Table 2", _table2),
    ("Table 3", _table3),
    ("Table 4", _table4),
    ("Table 5", _table5),
    ("Table 6", _table6),
    ("Table 7", _table7),
    ("Table 8", _table8),
    ("Figure 9", _figure9),
    ("Figure 10", _figure10),
    ("Figure 11", lambda a: _confusion(a, "Figure 11: confusion matrix of Freeze1", "freeze1")),
    ("Figure 12", lambda a: _confusion(a, "Figure 12: confusion matrix of Freeze2", "freeze2")),
    ("Figure 13", lambda a: _confusion(a, "Figure 13: confusion matrix of Freeze3", "freeze3")),
    ("Figure 14", _figure14),
)


def build_sections(stage_dirs: Mapping[str, Path | str | None], run_info: Mapping[str, Any]) -> list[Section]:
    """The report's sections; a section whose artifacts cannot be parsed says so and the others go on."""
    art = _Artifacts(stage_dirs)
    sections = []
    first = (("Header", lambda a: _header(a, run_info)), ("Verdicts", _verdicts),
             ("Run", lambda a: _run_section(a, run_info)))
    for name, build in (*first, *SECTIONS):
        try:
            sections.append(build(art))
        except Exception as exc:  # a malformed artifact must not take the whole report down
            broken = Section(f"{name}: could not be built", lead=name in ("Header", "Verdicts"))
            broken.note(f"{type(exc).__name__}: {exc}", "warning")
            sections.append(broken)
    return sections


def build_report(stage_dirs: Mapping[str, Path | str | None], out_dir: Path | str,
                 run_info: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` (self-contained) and ``tables/*.csv`` into ``out_dir``.

    ``stage_dirs`` maps a stage name (curate, patches, train, features, hashing, classify, and optionally
    detect and baselines) to its sealed folder;
    ``run_info`` may hold ``params`` (the whole params file), ``code_version``, ``stage_keys`` and
    ``report_key``. Returns the written paths (``md``, ``html``, ``tables``, ``figures``).
    """
    return write_report(TITLE, build_sections(stage_dirs, run_info), Path(out_dir))
