"""`mammo ui` on a finished smoke run, looked at in headless Chromium as a newcomer would.

The MLflow UI is a JavaScript app, so the check drives a real browser (tests/helpers/browser.py) against a real
`mammo ui` process on a copy of the session's smoke store, and asserts on what the browser laid out:

1. the experiment carries MLflow's experiment-kind tag (model training), and the link `mammo ui` prints
   opens the run table: the parent run's row, and, once its expander is clicked, one row per stage whose run
   ids are the parent's eleven child runs, each labelled with its stage name;
2. one child run's (train) model-metrics page shows its metric sections and a metric chart by name;
3. the parent run's `report/report.html` artifact renders inside the UI's artifact viewer: the report's
   title, every Table/Figure heading, and every figure decoded by the browser (naturalWidth > 0).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tasks.registry import ORDER
from tasks.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
from tests.core.reporting.test_report_render import HEADINGS
from tests.helpers.paths import REPO
from tests.helpers.processes import clean_env, free_port, stop_process, wait_http

STAGES = {spec.name for spec in ORDER}
pytestmark = pytest.mark.slow

ROW_IDS = "[...new Set([...document.querySelectorAll('[role=row][row-id]')].map(r => r.getAttribute('row-id')))]"
RUN_NAMES = ("[...document.querySelectorAll('[role=row][row-id]')].map(r => [r.getAttribute('row-id'), "
             "r.querySelector('[col-id=\"attributes.`Run Name`\"]')?.innerText || ''])")
REPORT_PROBE = """document.readyState === 'complete' && document.querySelectorAll('section h2').length > 0 && ({
  title: document.title,
  headings: [...document.querySelectorAll('section h2')].map(h => h.textContent),
  images: [...document.querySelectorAll('img')].map(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0),
  tables: document.querySelectorAll('table').length})"""


@pytest.fixture
def ui(smoke_store_copy, tmp_path):
    """A running `mammo ui` on a private copy of the smoke store: (base URL, its console output so far)."""
    port = free_port()
    log = tmp_path / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--store", str(smoke_store_copy),
                                 "--port", str(port)], cwd=REPO, env=clean_env(COLUMNS="300"), stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=240)  # slow to start on a busy 2-core box
        yield f"http://127.0.0.1:{port}", log.read_text()
    finally:
        stop_process(proc)


def test_the_ui_shows_the_run_its_stages_their_metrics_and_the_report(ui, smoke_store_copy, tmp_path):
    from tests.helpers.browser import Browser

    base, printed = ui
    client = MlflowClient(f"sqlite:///{smoke_store_copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mammo-fusion")
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == MODEL_TRAINING_KIND
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_id: r.data.tags["mlflow.runName"] for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children.values()) == STAGES
    train = next(run_id for run_id, name in children.items() if name == "train")

    link = re.search(r"runs of 'mammo-fusion': (\S+)", printed)
    assert link, f"`mammo ui` printed no link to the run table: {printed}"
    assert link.group(1) == f"{base}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"

    started = time.monotonic()
    browser = Browser(tmp_path)
    try:
        browser.open(link.group(1))
        browser.wait_for(f"{ROW_IDS}.includes('{parent.info.run_id}')", timeout=60)
        assert browser.evaluate("document.title").startswith("Runs"), "the run table is not what opened"
        browser.evaluate(f"document.querySelector('[role=row][row-id=\"{parent.info.run_id}\"] "
                         f"[role=gridcell] button').click()")
        browser.wait_for(f"{ROW_IDS}.length === {1 + len(children)}")
        assert set(browser.evaluate(ROW_IDS)) == {parent.info.run_id, *children}
        names = {run_id: text.split("\n")[-1].strip() for run_id, text in browser.evaluate(RUN_NAMES) if text}
        assert {run_id: names.get(run_id) for run_id in children} == children

        browser.open(f"{base}/#/experiments/{experiment.experiment_id}/runs/{train}/model-metrics"
                     f"?workflowType=machine_learning")
        browser.wait_for("document.body.innerText.includes('train/freeze1')")
        browser.wait_for("document.body.innerText.includes('best_val_acc')")  # train/freeze1/best_val_acc

        browser.open(f"{base}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}/artifacts/"
                     f"report/report.html?workflowType=machine_learning")
        browser.wait_for("!!document.querySelector('iframe.mlflow-html-iframe')?.src")
        report = browser.wait_for(REPORT_PROBE, context_id=browser.frame_context("blob:"))
    finally:
        browser.close()
    assert report["title"] == "mammo-fusion: run report"
    shown = {heading.split(":")[0] for heading in report["headings"]}
    assert set(HEADINGS) <= shown, f"headings not rendered: {set(HEADINGS) - shown}"
    assert report["images"] and all(report["images"]), f"figures not decoded: {report['images']}"
    assert report["tables"] >= 8
    assert time.monotonic() - started < 120, "the browser part should take well under a minute"
