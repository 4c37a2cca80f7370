"""The run report: the paper's Tables 1-8 and Figures 9-14 regenerated from the stage artifacts of one run.

Every number in the report is read from a file in a sealed stage folder, and every section ends with the
files it read ("Source: classify/table5_classifiers.csv (key ..., sha256 ...)"), so a reader can trace any
value back to the artifact that holds it. Nothing is recomputed here and nothing is invented: an artifact
that is missing turns into a line that names it, and an experiment whose stage folder was not given (the
single-network baselines of Tables 1, 6 and Figure 10, the detection of Table 8) says "not run" instead of
showing numbers. The paper's own values appear in columns labelled as claims (:mod:`mammo_core.paper_claims`).

Plain library code: reads files, returns/writes text. The ``report`` stage (``tasks/report.py``) logs the
output to MLflow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammo_core import paper_claims as claims
from mammo_core.report_render import Figure, Preformatted, Section, Table, format_value, write_report
from mammo_core.store import MANIFEST, file_sha256

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
    report = reader.json("curate", "curation_report.json")
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
    summary = reader.json("patches", "patches_summary.json")
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


def _not_run(heading: str, stage: str, claim: Table) -> Section:
    section = Section(heading)
    section.note(f"not run in this pipeline version: needs the {stage} stage, which this pipeline does not "
                 "have yet. No value of ours is shown.", "not_run")
    section.add(claim)
    _cite_paper(section, heading.split(":")[0])
    return section


def _table2(art: _Artifacts) -> Section:
    section = Section("Table 2: fusing any two branches, test accuracy per class")
    pairs = _Reader(art, section).csv("classify", "table2_pairs.csv", index_col=0)
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
    errors = _Reader(art, section).csv("classify", "table3_errors.csv", index_col=0)
    if errors is not None:
        errors.index.name = "class"
        section.add(Table("table3_wrong_by_one_branch", errors, "Ours: per class, test patches wrong only in "
                          "the named branch (right in the other two), and wrong in all three", index=True))
    section.add(_claims_table("table3_paper_claims", {k: tuple(map(str, v)) for k, v in claims.TABLE3_COUNTS.items()},
                              "category", tuple(f"{c} (claim)" for c in claims.TABLE3_COLUMNS),
                              "The paper's claimed counts: categories 1-7 are not named in the paper"))
    _cite_paper(section, "Table 3")
    return section


def _table4(art: _Artifacts) -> Section:
    section = Section("Table 4: hash decoder vs fully-connected alternative, retrieval MAP by code length")
    reader = _Reader(art, section)
    table = reader.csv("hashing", "table4_map.csv")
    if table is not None:
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
        section.add(Table("table4_map", frame, "Ours: MAP (and precision at 10) of test queries retrieving from the "
                          "training codes, per code length; MAP is the mean over the training seeds, sd the "
                          "sample standard deviation across seeds, and hash - FC the difference taken per seed "
                          "(both decoders trained with the same seed) then summarised"))
        if "n_seeds" not in table.columns:
            section.note("table4_map.csv has no per-seed summary (a hashing stage of an older version): one "
                         "training run per decoder, so the spread over seeds is unknown", "warning")
        elif int(table["n_seeds"].min()) < 3:
            section.note(f"only {int(table['n_seeds'].min())} training seed(s) per decoder (hashing.seeds): the "
                         "spread over seeds is not an estimate of the run-to-run variation", "warning")
        by_seed = reader.csv("hashing", "table4_map_by_seed.csv") if "n_seeds" in table.columns else None
        if by_seed is not None:
            section.add(Table("table4_map_by_seed", by_seed, "MAP of each decoder per code length and training seed "
                              "(hash_minus_fc_map: the paired difference of that seed)"))
        section.note(CLAIM_NOTE + " The project's paper notes say this table of the paper resembles the results of "
                     "Lai et al. (CVPR 2015).", "claim")
        _cite_paper(section, "Table 4")
    reader.figure("hashing", "table4_map.png", "Retrieval MAP by code length (hashing stage figure)")
    stats = reader.csv("hashing", "bit_statistics.csv")
    if stats is not None:
        section.add(Table("table4_bit_statistics", stats, "Bit statistics of the first seed's relaxed codes on "
                          "the test split (fraction binary, fraction outside the threshold band, bit balance, "
                          "constant bits, mean absolute correlation between bits)"))
    return section


def _table5(art: _Artifacts) -> Section:
    section = Section("Table 5: classifiers on the hash codes, with confidence intervals")
    reader = _Reader(art, section)
    manifest = reader.manifest("classify", "params classify.n_boot, classify.codes")
    table = reader.csv("classify", "table5_classifiers.csv")
    if table is not None:
        main = [c for c in ("classifier", "test_acc", "test_acc_ci_low", "test_acc_ci_high", "macro_f1",
                            "balanced_acc", "auc_ovr_macro") if c in table.columns]
        frame = table[main].copy()
        frame["paper (claim) accuracy %"] = [claims.TABLE5_ACCURACY_PCT.get(c, "") for c in table["classifier"]]
        if "note" in table.columns:
            frame["note"] = table["note"].fillna("")
        params = (manifest or {}).get("params", {}).get("classify", {})
        boot = f"{params['n_boot']} resamples" if "n_boot" in params else "resample count not recorded"
        section.add(Table("table5_classifiers", frame, f"Ours: test accuracy with its 95% patient-bootstrap "
                          f"percentile interval ({boot}), codes {params.get('codes', '?')}"))
        section.note(CLAIM_NOTE + " The paper's 'Ours' row is our 'fusion' row.", "claim")
        _cite_paper(section, "Table 5")
        recall = [c for c in table.columns if c.startswith("recall/")]
        if recall:
            per_class = table[["classifier", *recall]].rename(columns=lambda c: c.removeprefix("recall/"))
            section.add(Table("table5_recall_per_class", per_class, "Ours: test recall per class"))
    info = reader.json("classify", "classifier.json")
    if info is not None and info.get("weights"):
        weights = pd.DataFrame(sorted(info["weights"].items()), columns=["classifier", "fusion weight"])
        section.add(Table("table5_fusion_weights", weights, "Soft-voting weights of the fused classifier"))
    return section


def _table7(art: _Artifacts) -> Section:
    section = Section("Table 7: frozen parameters and test accuracy per branch")
    reader = _Reader(art, section)
    config = reader.json("train", "model_config.json")
    train = reader.manifest("train", "metrics train/<branch>/test_acc")
    feats = reader.manifest("features", "metrics features/<branch|fused>/test_acc")
    counts = (config or {}).get("parameter_counts", {})
    branches = list(counts) or list(BRANCHES)
    train_metrics, feat_metrics = (train or {}).get("metrics", {}), (feats or {}).get("metrics", {})
    rows = []
    for b in branches:
        paper_params, paper_acc = claims.TABLE7.get(b, ("", ""))
        rows.append({"model": b, "frozen params": counts.get(b, {}).get("frozen", np.nan),
                     "trainable params": counts.get(b, {}).get("trainable", np.nan),
                     "paper (claim) frozen params": paper_params,
                     "test_acc (branch head, train stage)": _metric(train_metrics, f"train/{b}/test_acc"),
                     "test_acc (linear probe, features stage)": _metric(feat_metrics, f"features/{b}/test_acc"),
                     "paper (claim) test accuracy %": paper_acc})
    paper_params, paper_acc = claims.TABLE7["fused"]
    rows.append({"model": "fused", "frozen params": np.nan, "trainable params": np.nan,
                 "paper (claim) frozen params": paper_params, "test_acc (branch head, train stage)": np.nan,
                 "test_acc (linear probe, features stage)": _metric(feat_metrics, "features/fused/test_acc"),
                 "paper (claim) test accuracy %": paper_acc})
    section.add(Table("table7_branches", pd.DataFrame(rows), "Ours: parameter counts of each branch, its own "
                      "classifier head's test accuracy, and a linear probe's test accuracy on its features (the "
                      "fused row: the probe on the weighted fused features)"))
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
    history = reader.json("train", "history.json")
    if history is not None:
        section.add(Table("figure9_val_acc", _val_curves(history), "Validation accuracy per epoch", index=True))
    fusion = reader.json("features", "fusion.json")
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
    grid = reader.csv("features", "fusion_grid.csv")
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
# Where the fused model's own per-image latency may be recorded (stage, manifest metric), first found wins.
FUSED_LATENCY_METRICS = (("train", "train/fused/latency_ms"), ("features", "features/fused/latency_ms"),
                         ("classify", "classify/fusion/latency_ms"), ("baselines", "baselines/fused/latency_ms"))


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
    base = reader.json("baselines", "baselines.json") or {}
    train = reader.manifest("train", "metrics train/<branch>/test_acc") or {}
    table5 = reader.csv("classify", "table5_classifiers.csv")
    rows = []

    def add(method: str, kind: str, source: str, row: Mapping[str, Any]) -> None:
        rows.append({"method": method, "kind": kind, "test_acc": row.get("test_acc", np.nan),
                     "ci_low": row.get("ci_low", np.nan), "ci_high": row.get("ci_high", np.nan),
                     "paper row": TABLE1_PAPER_ROWS.get(method, ""),
                     "paper (claim) accuracy %": claims.TABLE1_ACCURACY_PCT.get(TABLE1_PAPER_ROWS.get(method, ""), ""),
                     "source": source})

    for row in base.get("classic", []):
        add(str(row["method"]), "classic", "baselines/baselines.json", row)
    for row in base.get("rows", []):
        add(str(row["network"]), "single network", "baselines/baselines.json", row)
    for b in BRANCHES:
        add(b, "our branch (own head)", "train/manifest.json",
            {"test_acc": _metric(train.get("metrics"), f"train/{b}/test_acc")})
    fusion = _fusion_row(table5)
    add("fusion", "ours: fused SVM+kNN+RF on hash codes", "classify/table5_classifiers.csv",
        {"test_acc": fusion.get("test_acc", np.nan), "ci_low": fusion.get("test_acc_ci_low", np.nan),
         "ci_high": fusion.get("test_acc_ci_high", np.nan)})
    section.add(Table("table1_methods", pd.DataFrame(rows), "Ours: test accuracy of the classic methods, the single "
                      "networks, our branches and our fused classifier, with 95% bootstrap intervals where the "
                      "stage computed them; 'paper row' names the row of the paper's Table 1 the claim is from"))
    if "majority_rate" in base:
        section.note(f"Majority-class rate on the test split: {format_value(base['majority_rate'])} "
                     "(baselines/baselines.json), the accuracy of always answering the most frequent class.")
    details = [f"{r['method']}: {r['detail']}" for r in base.get("classic", []) if r.get("detail")]
    for text in details:
        section.note(text)
    section.note(CLAIM_NOTE + " The paper gives no ResNet50 row in Table 1.", "claim")
    _cite_paper(section, "Table 1")
    return section


def _fused_latency(art: _Artifacts, reader: _Reader) -> tuple[float, str]:
    """(latency in ms, where it came from) for our fused model, or (nan, what was looked for)."""
    for stage, metric in FUSED_LATENCY_METRICS:
        manifest = art.manifest(stage) if _given(art, stage) else None
        value = (manifest or {}).get("metrics", {}).get(metric)
        if value is not None:
            reader.manifest(stage, f"metric {metric}")
            return float(value), f"{stage}/manifest.json"
    return float("nan"), ", ".join(metric for _, metric in FUSED_LATENCY_METRICS)


def _table6(art: _Artifacts) -> Section:
    claim = _claims_table("table6_paper_claims", claims.TABLE6, "method",
                          ("paper (claim) accuracy %", "paper (claim) time ms"),
                          "The paper's claimed values (not measured here)")
    if not _given(art, "baselines"):
        return _not_run("Table 6: single-network methods, accuracy and inference time", "baselines", claim)
    section = Section("Table 6: single-network methods, accuracy and inference time")
    reader = _Reader(art, section)
    base = reader.json("baselines", "baselines.json") or {}
    rows = []
    for row in base.get("rows", []):
        paper = claims.TABLE6.get(TABLE6_PAPER_ROWS.get(str(row["network"]), ""), ("", ""))
        rows.append({"method": row["network"], "test_acc": row.get("test_acc", np.nan),
                     "ci_low": row.get("ci_low", np.nan), "ci_high": row.get("ci_high", np.nan),
                     "balanced_acc": row.get("balanced_acc", np.nan), "latency_ms": row.get("latency_ms", np.nan),
                     "params_m": row.get("params_m", np.nan), "input_size": row.get("input_size", np.nan),
                     "epochs": row.get("epochs", np.nan), "weights": row.get("weights", ""),
                     "paper (claim) accuracy %": paper[0], "paper (claim) time ms": paper[1],
                     "source": "baselines/baselines.json"})
    fusion = _fusion_row(reader.csv("classify", "table5_classifiers.csv"))
    latency, latency_source = _fused_latency(art, reader)
    paper = claims.TABLE6["Our"]
    rows.append({"method": "fusion", "test_acc": fusion.get("test_acc", np.nan),
                 "ci_low": fusion.get("test_acc_ci_low", np.nan), "ci_high": fusion.get("test_acc_ci_high", np.nan),
                 "balanced_acc": fusion.get("balanced_acc", np.nan), "latency_ms": latency,
                 "paper (claim) accuracy %": paper[0], "paper (claim) time ms": paper[1],
                 "source": "classify/table5_classifiers.csv" + ("" if math.isnan(latency) else f", {latency_source}")})
    section.add(Table("table6_single_networks", pd.DataFrame(rows), "Ours: each single network trained on the same "
                      "patches (test accuracy with its 95% bootstrap interval, per-image inference latency), and our "
                      "fused classifier"))
    if math.isnan(latency):
        section.note("The fused model's inference latency is not recorded by any artifact of this run (looked for "
                     f"manifest metrics {latency_source}); its latency cell is empty.", "missing")
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
    det = reader.json("detect", "detection.json") or {}
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
        section.note("not run in this pipeline version: needs the baselines stage, which this pipeline does not "
                     "have yet.", "not_run")
        return section
    section = Section("Figure 10: validation accuracy of other backbones")
    reader = _Reader(art, section)
    reader.figure("baselines", "figure10_val_curves.png", "Validation accuracy per epoch of each single network "
                  "(baselines stage figure)")
    curves = reader.json("baselines", "val_curves.json")
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


SECTIONS: tuple[tuple[str, Callable[[_Artifacts], Section]], ...] = (
    ("Data summary", _data_section),
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
    for name, build in (("Run", lambda a: _run_section(a, run_info)), *SECTIONS):
        try:
            sections.append(build(art))
        except Exception as exc:  # a malformed artifact must not take the whole report down
            broken = Section(f"{name}: could not be built")
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
