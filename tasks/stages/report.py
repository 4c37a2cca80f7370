"""report: the paper's Tables 1-8 and Figures 9-14 from this run's stage artifacts (mammo_core.reporting.report).

The stage has no params section: its key is its code plus the keys of the stages it reads, so any change
upstream rebuilds the report and nothing else does. The report goes into the stage folder and to MLflow,
both on the report's own child run and on the parent run of the ``mammo run`` that built it, where a user
opening the run finds it first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from mammo_core.config import Params
from mammo_core.sources import weight_sources
from mammo_core.storage import stage_files
from tasks import runtime, tracking

FILES = stage_files.REPORT  # this stage's output files

UPSTREAM = ("curate", "patches", "train", "features", "hashing", "classify", "detect", "baselines")


def report_files(folder: Path) -> list[tuple[Path, str]]:
    """(file, MLflow artifact folder) for everything a finished report folder holds."""
    files = [(folder / FILES.markdown, "report"), (folder / FILES.html, "report")]
    files += [(path, "report/tables") for path in sorted((folder / "tables").glob("*.csv"))]
    files += [(path, "report/figures") for path in sorted((folder / "figures").glob("*.png"))]
    return [(path, where) for path, where in files if path.is_file()]


def log_report(client: MlflowClient, run_id: str, folder: Path) -> None:
    """Attach a finished report to an MLflow run (also usable for a reused report on a new parent run)."""
    for path, where in report_files(Path(folder)):
        client.log_artifact(run_id, str(path), where)


def initialisation(params: Params) -> list[dict[str, Any]]:
    """Where every network of the run starts from (the report's header), resolved as the stages resolve it.

    The same files decide the train, baselines and detect keys (their ``key_inputs``), so a report built
    on those stages' folders names the files, and sha256, they were trained from.
    """
    rows = [{"network": "Freeze1, Freeze2, Freeze3 (DenseNet-121 branches)", "stage": "train",
             **weight_sources.describe(params.train.weights, weight_sources.backbone_file(params.train.weights))}]
    b = params.baselines
    for name in b.networks:
        path = weight_sources.hub_file(name) if b.weights == "imagenet" else None
        rows.append({"network": name, "stage": "baselines", **weight_sources.describe(b.weights, path)})
    d = params.detect
    rows.append({"network": "ours (detector on the fused DenseNets)", "stage": "detect", "requested": "train stage",
                 "initialisation": "the train stage's trained Freeze1-3 network", "file": "", "sha256": ""})
    if "frcnn_r50" in d.baselines:
        rows.append({"network": "frcnn_r50 (Faster R-CNN ResNet-50 FPN)", "stage": "detect",
                     **weight_sources.describe(d.r50_weights, weight_sources.r50_detector_file(d.r50_weights))})
    return rows


def _run(ctx: runtime.StageContext) -> None:
    from mammo_core.reporting import report

    tags = ctx.client.get_run(ctx.run_id).data.tags  # git_commit and the parent (``mammo run``) run id
    run_info = {
        "params": ctx.params.model_dump(mode="json"),
        "code_version": tags.get("git_commit") or "not recorded",
        "stage_keys": {name: ctx.upstream[name].key for name in UPSTREAM},
        "report_key": ctx.key,
        "initialisation": initialisation(ctx.params),
    }
    report.build_report({name: Path(ctx.upstream[name].path) for name in UPSTREAM}, ctx.workdir, run_info)
    files = report_files(ctx.workdir)
    ctx.log_metric("report/tables", float(sum(1 for _, where in files if where == "report/tables")))
    for path, where in files:
        ctx.log_artifact(path, where)
    parent = tags.get(tracking.PARENT_TAG)
    if parent:
        log_report(ctx.client, parent, ctx.workdir)
    else:
        ctx.logger.warning("report: the stage run has no parent run; the report is logged to the stage run only")


SPEC = runtime.StageSpec(
    name="report",
    upstream=UPSTREAM,
    sections=(),
    run=_run,
)


@task(persist_result=False, cache_policy=NO_CACHE)
def report_task(ctx: runtime.RunContext, result: runtime.StageResult) -> None:
    """Attach a reused report to this run's parent run (a cache hit otherwise copies only metrics)."""
    log_report(MlflowClient(ctx.tracking_uri), ctx.parent_run_id, Path(result.path))
