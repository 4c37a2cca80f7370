"""``mammo compare``: pure comparison functions on known values, and the command on two real smoke runs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from mammo_core.reporting import compare as cmp


def test_params_are_flattened_and_only_changed_ones_flagged():
    a = {"classify": {"n_boot": 100, "codes": "hash@48"}, "hashing": {"bits": [12, 48]}, "run": {"seed": 0}}
    b = {"classify": {"n_boot": 50, "codes": "hash@48"}, "hashing": {"bits": [12, 48]}, "detect": {"epochs": 1}}
    frame = cmp.compare_params(a, b).set_index("param")
    assert list(frame.index) == ["classify.codes", "classify.n_boot", "detect.epochs", "hashing.bits", "run.seed"]
    assert frame.loc["classify.n_boot", "diff"] == -50
    assert frame.loc["hashing.bits", "a"] == "[12, 48]" and not frame.loc["hashing.bits", "differs"]
    assert set(frame.index[frame["differs"]]) == {"classify.n_boot", "detect.epochs", "run.seed"}
    assert frame.loc["detect.epochs", "a"] is None  # absent from A, shown empty, counted as different


def test_metrics_side_by_side_with_b_minus_a():
    frame = cmp.compare_metrics({"classify/fusion/test_acc": 0.5, "train/seconds": 3.0, "x/nan": float("nan")},
                                {"classify/fusion/test_acc": 0.625, "train/seconds": 3.0, "x/nan": float("nan"),
                                 "detect/ours/map50": 0.25}).set_index("metric")
    assert frame.loc["classify/fusion/test_acc", "diff"] == 0.125
    assert bool(frame.loc["classify/fusion/test_acc", "differs"])
    assert not frame.loc["train/seconds", "differs"] and not frame.loc["x/nan", "differs"]
    assert bool(frame.loc["detect/ours/map50", "differs"]) and math.isnan(frame.loc["detect/ours/map50", "diff"])


def test_tables_are_matched_by_their_first_column_not_by_position():
    a = pd.DataFrame({"classifier": ["knn", "svm", "fusion"], "test_acc": [0.5, 0.6, 0.7], "note": ["", "", ""]})
    b = pd.DataFrame({"classifier": ["svm", "fusion"], "test_acc": [0.6, 0.75], "note": ["", "x"]})
    cells = cmp.compare_table(a, b).set_index(["row", "column"])
    assert cells.loc[("fusion", "test_acc"), "diff"] == pytest.approx(0.05)
    assert not cells.loc[("svm", "test_acc"), "differs"]
    assert bool(cells.loc[("knn", "test_acc"), "differs"]) and cells.loc[("knn", "test_acc"), "b"] is None
    assert bool(cells.loc[("fusion", "note"), "differs"])
    assert len(cells) == 6  # 3 rows x 2 value columns: the key column is the row label, not a cell


def test_a_table_without_a_unique_first_column_is_compared_by_position():
    a = pd.DataFrame({"w1": [0.0, 0.0], "val_acc": [0.25, 0.5]})
    b = pd.DataFrame({"w1": [0.0, 0.0], "val_acc": [0.25, 0.375]})
    cells = cmp.compare_table(a, b).set_index(["row", "column"])
    assert cells.loc[("row 1", "val_acc"), "diff"] == -0.125
    assert not cells.loc[("row 0", "val_acc"), "differs"] and not cells.loc[("row 1", "w1"), "differs"]


def test_compare_runs_writes_every_item_to_one_long_frame_and_markdown():
    t5 = pd.DataFrame({"classifier": ["fusion"], "test_acc": [0.5]})
    low = "classify/fusion/test_acc_ci_low"
    comparison = cmp.compare_runs(("A1", "B2"), ({"classify": {"n_boot": 100}}, {"classify": {"n_boot": 50}}),
                                  ({low: 0.3125}, {low: 0.25}),
                                  ({"table5_classifiers": t5, "only_a": t5}, {"table5_classifiers": t5}))
    assert comparison.changed_params == ["classify.n_boot"]
    assert comparison.notes == ["table only_a exists only in run A1"]
    frame = cmp.to_frame(comparison)
    assert list(frame.columns) == ["kind", "table", "row", "column", "a (A1)", "b (B2)", "diff", "differs"]
    metric = frame[(frame["kind"] == "metric")].iloc[0]
    assert metric["row"] == "classify/fusion/test_acc_ci_low" and metric["diff"] == -0.0625
    assert set(frame.loc[frame["kind"] == "table", "table"]) == {"table5_classifiers", "only_a"}
    md = cmp.render_markdown(comparison)
    assert "| classify.n_boot | 100 | 50 | -50 | **yes** |" in md.split("## Metrics")[0]
    assert "| classify/fusion/test_acc_ci_low | 0.3125 | 0.25 | -0.0625 | **yes** |" in md
    assert "## Table table5_classifiers (1 cells, 0 differ)" in md
    assert "| fusion | test_acc | 0.5 | 0.5 | 0 |  |" in md


def _classify_run(root: Path, run_id: str, key: str, test_correct: list[bool] | None) -> object:
    """A pipeline parent run (as flows.run_lookup.PipelineRun sees it) whose classify stage folder holds
    ``predictions.csv`` with the given per-patch test outcomes (2 patches per patient); None: no file."""
    from types import SimpleNamespace

    from flows.run_lookup import PipelineRun

    folder = root / "stages" / "classify" / key
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}", encoding="utf-8")
    if test_correct is not None:
        labels = [i % 3 for i in range(len(test_correct))]
        pd.DataFrame({"split": "test", "classifier": "fusion", "source_id": [f"s{i}" for i in range(len(labels))],
                      "patient_id": [f"P{i // 2}" for i in range(len(labels))], "label": labels,
                      "predicted": [y if ok else (y + 1) % 3 for y, ok in zip(labels, test_correct, strict=True)]}
                     ).to_csv(folder / "predictions.csv", index=False)
    run = SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(tags={"stage.classify": key}))
    return PipelineRun(run=run, children={})


def test_compare_prints_paired_test_cis_from_the_classify_predictions(tmp_path):
    from rich.console import Console

    from flows.commands.compare_cmd import paired_test_differences, print_comparison, write_comparison

    a_correct = [i % 5 != 0 for i in range(200)]  # 80 % right
    b_correct = [True] * 200  # fixes all 40 errors, spread over 40 patients: beyond noise
    runs = (_classify_run(tmp_path, "runA", "k" * 24, a_correct), _classify_run(tmp_path, "runB", "j" * 24, b_correct))
    paired, notes = paired_test_differences(tmp_path, runs)
    row = paired.set_index(["classifier", "metric"]).loc[("fusion", "accuracy")]
    assert (row["a"], row["b"], row["diff"]) == pytest.approx((0.8, 1.0, 0.2))
    assert 0 < row["ci_low"] < 0.2 < row["ci_high"] and row["distinguishable"] and row["n_patients"] == 100
    assert any("svm" in n for n in notes)  # classifiers without predictions are named, not invented
    comparison = cmp.compare_runs(("runA", "runB"), ({}, {}), ({}, {}), ({}, {}))
    comparison.paired = paired
    paths = write_comparison(comparison, tmp_path / "out")
    md = paths["md"].read_text(encoding="utf-8")
    assert "| fusion | accuracy | 0.8000 | 1.0000 | +0.2000 |" in md and "| distinguishable from noise |" in md
    assert pd.read_csv(paths["paired"]).shape[0] == 2
    console = Console(width=200, record=True)
    print_comparison(comparison, console)
    assert "distinguishable from noise" in console.export_text()
    # different test splits: no CI, said so
    other = _classify_run(tmp_path, "runC", "m" * 24, b_correct[:150])
    paired, notes = paired_test_differences(tmp_path, (runs[0], other))
    assert paired.empty and "the test splits differ: 50 patch(es) only in A" in notes[0]
    old = _classify_run(tmp_path, "runD", "n" * 24, None)
    paired, notes = paired_test_differences(tmp_path, (runs[0], old))
    assert paired is None and "runD has no classify predictions.csv" in notes[0]


def test_compare_pairs_the_detectors_test_ap50_from_the_detect_stages_tables(tmp_path):
    """Two runs' detect folders: B's detector finds 18 of 20 test lesions where A's finds 6 -> beyond noise."""
    from types import SimpleNamespace

    from rich.console import Console

    from flows.commands.compare_cmd import paired_test_differences, print_comparison
    from flows.commands.report_cmd import PipelineRun
    from tests.helpers import detection_cases as cases

    truth = cases.targets(40)
    runs = []
    for run_id, key, found in (("runA", "a" * 24, 12), ("runB", "b" * 24, 36), ("runC", "c" * 24, 12)):
        cases.write_detect_folder(tmp_path / "stages" / "detect" / key, {"test": (truth, {
            "ours": cases.detections(truth, [i < found for i in range(40)])})})
        run = SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(tags={"stage.detect": key}))
        runs.append(PipelineRun(run=run, children={}))
    paired, notes = paired_test_differences(tmp_path, (runs[0], runs[1]))
    assert any("no classify predictions.csv" in n for n in notes)  # no classify folder: said, detectors still paired
    rows = paired.set_index(["classifier", "metric"])
    ap = rows.loc[("detector ours", "lesion_ap50")]
    assert (ap["a"], ap["b"], ap["diff"]) == pytest.approx((31 / 101, 91 / 101, 60 / 101))
    assert 0 < ap["ci_low"] < ap["diff"] < ap["ci_high"] and ap["distinguishable"] and ap["n_patients"] == 20
    assert rows.loc[("detector ours", "map50"), "distinguishable"]
    comparison = cmp.compare_runs(("runA", "runB"), ({}, {}), ({}, {}), ({}, {}))
    comparison.paired = paired
    console = Console(width=200, record=True)
    print_comparison(comparison, console)
    printed = console.export_text()
    assert "detector ours" in printed and "+0.5941" in printed and "distinguishable from noise" in printed
    # the same detections in another run: B - A is 0 with a CI of [0, 0], not distinguishable
    same, _ = paired_test_differences(tmp_path, (runs[0], runs[2]))
    assert (same["diff"] == 0).all() and (same["ci_low"] == 0).all() and not same["distinguishable"].any()
    assert "not distinguishable from noise" in "\n".join(cmp.paired_lines(same, ("runA", "runC")))


# ------------------------------------------------------------------------------ two real smoke runs


@pytest.fixture(scope="module")
def two_runs(smoke_store, tmp_path_factory) -> tuple[Path, str, str]:
    """Two `mammo run` on the smoke params in one store; the second changes only classify.n_boot.

    The first is the session's fresh smoke run (conftest ``smoke_store``), taken as a copy.
    """
    from tests.e2e.test_pipeline_e2e import SMOKE, mammo, runs_of
    from tests.helpers.smoke_store import copy_store

    store = copy_store(smoke_store, tmp_path_factory.mktemp("compare") / "store")
    mammo(store, "run", "-p", str(SMOKE), "--set", "classify.n_boot=50")
    parents = [r.info.run_id for r in runs_of(store) if r.data.tags.get("kind") == "pipeline"]
    assert len(parents) == 2
    return store, parents[0], parents[1]


@pytest.mark.slow
def test_compare_two_smoke_runs_flags_the_changed_param_and_writes_md_and_csv(two_runs, tmp_path):
    from tests.e2e.test_pipeline_e2e import mammo

    store, run_a, run_b = two_runs
    out = tmp_path / "cmp"
    proc = mammo(store, "compare", run_a, run_b, "--out", str(out))
    assert "params that differ: classify.n_boot" in proc.stderr.replace("\n", " ")
    assert "classify.n_boot" in proc.stdout
    frame = pd.read_csv(out / "compare.csv")
    params = frame[frame["kind"] == "param"].set_index("row")
    assert list(params.index[params["differs"]]) == ["classify.n_boot"]
    assert str(params.loc["classify.n_boot", f"a ({run_a})"]) == "100"  # mixed types: the CSV holds text
    assert str(params.loc["classify.n_boot", f"b ({run_b})"]) == "50"
    metrics = frame[frame["kind"] == "metric"].set_index("row")
    # the curate stage was reused: its counts are the same in both runs
    assert metrics.loc["curate/images", "diff"] == 0 and not metrics.loc["curate/images", "differs"]
    assert "classify/fusion/test_acc" in metrics.index and "report/tables" in metrics.index
    tables = frame[frame["kind"] == "table"]
    assert {"table5_classifiers", "table4_map", "table7_branches", "data_per_split"} <= set(tables["table"])
    t5 = tables[tables["table"] == "table5_classifiers"].set_index(["row", "column"])
    assert not t5.loc[("fusion", "test_acc"), "differs"]  # same model, only the bootstrap count changed
    md = (out / "compare.md").read_text(encoding="utf-8")
    assert f"# mammo compare: A = {run_a}, B = {run_b}" in md
    assert "| classify.n_boot | 100 | 50 | -50 | **yes** |" in md
    # both runs scored the same test patches with the same models: every paired B - A is exactly 0, noise
    paired = pd.read_csv(out / "compare_paired_test.csv").set_index(["classifier", "metric"])
    assert {("fusion", "accuracy"), ("fusion", "balanced_accuracy")} <= set(paired.index)
    assert (paired["diff"] == 0).all() and (paired["ci_low"] == 0).all() and not paired["distinguishable"].any()
    fusion_test_acc = float(t5.loc[("fusion", "test_acc"), f"a ({run_a})"])
    assert paired.loc[("fusion", "accuracy"), "a"] == pytest.approx(fusion_test_acc)
    assert "## Paired bootstrap on the shared test split" in md
    assert "not distinguishable from noise" in md.split("## Paired bootstrap")[1]
    assert "paired bootstrap on the shared test split" in proc.stdout


@pytest.mark.slow
def test_report_command_rebuilds_a_past_runs_report_from_its_folders(two_runs, tmp_path):
    from tests.e2e.test_pipeline_e2e import mammo

    store, run_a, _ = two_runs
    out = tmp_path / "rep"
    proc = mammo(store, "report", run_a, "--out", str(out))
    assert proc.stdout.strip() == str(out)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "(100 resamples)" in md  # run A's classify folder, not the later n_boot=50 one
    rebuilt = {p.name for p in (out / "tables").glob("*.csv")}
    stage_folder = next(p for p in (store / "stages" / "report").iterdir() if (p / "tables").is_dir()
                        and "(100 resamples)" in (p / "report.md").read_text(encoding="utf-8"))
    logged = {p.name for p in (stage_folder / "tables").glob("*.csv")}
    # the same tables as the run's own report; the command also reads the run's detect and baselines folders
    # when the report stage does not list them upstream yet, so Tables 1, 6, 8 and Figure 10 may have more
    new_stage_tables = ("table1_", "table6_", "table8_", "figure10_")
    assert {n for n in logged if not n.startswith(new_stage_tables)} == \
        {n for n in rebuilt if not n.startswith(new_stage_tables)}
    t5 = pd.read_csv(out / "tables" / "table5_classifiers.csv")
    assert t5.equals(pd.read_csv(stage_folder / "tables" / "table5_classifiers.csv"))
    latest = mammo(store, "report")  # no run id: the latest run (B, n_boot=50)
    assert "(50 resamples)" in (Path(latest.stdout.strip()) / "report.md").read_text(encoding="utf-8")
    missing = mammo(store, "report", "no-such-run", check=False)
    assert missing.returncode == 2 and "no MLflow run 'no-such-run'" in missing.stderr


SOURCE_FILE = re.compile(r"^Source: (\w+)/(\S+) \(key ([0-9a-f]+), sha256 ([0-9a-f]{12})\)", re.M)
SOURCE_MANIFEST = re.compile(r"^Source: (\w+)/manifest\.json \(key ([0-9a-f]+),", re.M)


@pytest.mark.slow
def test_the_smoke_runs_report_is_complete_and_every_source_is_a_sealed_file(two_runs, tmp_path):
    """The report a real smoke run logged: non-empty tables, each section sourced, each source file on disk."""
    from mammo_core.storage.store import file_sha256
    from tests.core.reporting.test_report import sections_of
    from tests.core.reporting.test_report_render import HEADINGS, render

    store, _, run_b = two_runs
    folder = next(p for p in (store / "stages" / "report").iterdir() if (p / "manifest.json").is_file()
                  and "(50 resamples)" in (p / "report.md").read_text(encoding="utf-8"))
    md = (folder / "report.md").read_text(encoding="utf-8")
    sections = sections_of(md)
    for label in HEADINGS:
        text = sections[label]
        sourced = SOURCE_FILE.search(text) or SOURCE_MANIFEST.search(text)
        assert sourced or "not run: no" in text, f"{label}: no artifact named as source"
        assert "**Missing:**" not in text and "could not be built" not in text, (label, text[:400])
    files = SOURCE_FILE.findall(md)
    assert len(files) >= 15
    for stage, name, key, sha in files:
        path = store / "stages" / stage / key / name
        assert path.is_file() and file_sha256(path).startswith(sha), (stage, name, key)
    for stage, key in SOURCE_MANIFEST.findall(md):
        assert (store / "stages" / stage / key / "manifest.json").is_file(), (stage, key)
    tables = sorted((folder / "tables").glob("*.csv"))
    assert len(tables) >= 15 and all(len(pd.read_csv(t)) > 0 for t in tables), [t.name for t in tables]
    # spot checks: numbers in the report's tables are the stage files' numbers, unchanged
    keys = {s: k for s, _, k, _ in files}
    ours = pd.read_csv(folder / "tables" / "table5_classifiers.csv").set_index("classifier")["test_acc"]
    theirs = pd.read_csv(store / "stages" / "classify" / keys["classify"] / "table5_classifiers.csv")
    pd.testing.assert_series_equal(ours, theirs.set_index("classifier")["test_acc"])
    ours = pd.read_csv(folder / "tables" / "table4_map.csv")["hash MAP"]
    theirs = pd.read_csv(store / "stages" / "hashing" / keys["hashing"] / "table4_map.csv")["hash_map"]
    assert list(ours) == list(theirs)
    # and the page renders: every heading, no broken image
    rendered = {s["heading"].split(":")[0]: s for s in render(folder / "report.html", tmp_path)["sections"]}
    assert set(HEADINGS) <= set(rendered)
    images = [i for s in rendered.values() for i in s["images"]]
    assert len(images) >= 7 and all(i["complete"] and i["width"] > 0 for i in images)
