"""The stage machinery shared by every stage module in ``tasks/``.

A stage is a :class:`StageSpec`: a name, its upstream stages, the params sections that enter its key
(its code is the import closure of its module), and a ``run`` function that writes its outputs into a
temporary folder. This module turns a spec into (1) a content-derived key, (2) a Prefect task (not
cached by Prefect, see :func:`stage_task`), (3) an MLflow child run, and (4) an atomically sealed folder
in the artifact store.

The store is the source of truth: the task body first looks for a sealed folder with the key, so a
deleted Prefect database costs nothing but a few milliseconds per stage.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from mammo_core.config import Params
from mammo_core.runtime import faults, stop_request
from mammo_core.storage import code_closure, stage_lock
from mammo_core.storage.library_versions import library_versions
from mammo_core.storage.store import ArtifactStore, stage_key
from mammo_core.storage.verified_files import VerifiedFiles
from tasks import tracking


@dataclass(frozen=True)
class RunContext:
    """What every stage of one ``mammo run`` shares. Plain data and the frozen, picklable params: it crosses
    thread/process boundaries. The params were validated once, where the run was opened
    (:func:`tasks.run_tracking.open_run`); stages read them typed, never re-validating a dict."""

    store: str
    params: Params
    params_file: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    flow_run_id: str
    git_commit: str
    force: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StageResult:
    """What a stage hands downstream (and what Prefect persists as the task result)."""

    stage: str
    key: str
    path: str
    metrics: dict[str, float]
    mlflow_run_id: str | None
    parent_run_id: str | None
    seconds: float
    ran: bool

    def file(self, name: str) -> Path:
        return Path(self.path) / name


@dataclass
class StageContext:
    """Passed to a stage's ``run``: where to write, what came before, how to report."""

    stage: str
    key: str
    workdir: Path
    params: Params
    upstream: dict[str, StageResult]
    store_root: Path
    client: MlflowClient
    run_id: str
    logger: logging.Logger | logging.LoggerAdapter
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def scratch(self) -> Path:
        """A folder that survives a crash of this stage (checkpoints), removed once the stage is sealed.

        Unlike ``workdir`` (a fresh temporary per attempt), its path depends only on (stage, key), so a
        rerun after a kill finds the previous attempt's checkpoints there.
        """
        path = scratch_dir(self.store_root, self.stage, self.key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        """Log to MLflow now; the last value of each name also goes to the manifest."""
        tracking.log_metrics(self.client, self.run_id, {name: value}, step=step or 0)
        self.metrics[name] = float(value)

    def log_metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        tracking.log_metrics(self.client, self.run_id, values, step=step or 0)
        self.metrics.update({k: float(v) for k, v in values.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, path: Path, name: str, context: str) -> None:
        tracking.log_file_dataset(self.client, self.run_id, path, name, context)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))


@dataclass(frozen=True)
class StageSpec:
    """A stage. Its key covers its params sections, its upstream keys, the code its module reaches through
    imports (:mod:`mammo_core.storage.code_closure`), the versions of the libraries that code imports, and
    ``key_inputs(params)``: what else on disk decides its output (data under ``data.root``, weight files)."""

    name: str
    upstream: tuple[str, ...]
    sections: tuple[str, ...]
    run: Callable[[StageContext], None]
    manifest_extra: Callable[[StageContext], dict[str, Any]] | None = None
    key_inputs: Callable[[Params], dict[str, Any]] | None = None

    def params_of(self, params: Params) -> dict[str, Any]:
        return {s: params.section(s) for s in self.sections}

    def key(self, params: Params, upstream_keys: Mapping[str, str], code_root: Path | None = None) -> str:
        """The stage key; ``code_root`` hashes the project's code under another folder (a copy, in tests)."""
        missing = set(self.upstream) - set(upstream_keys)
        if missing:
            raise ValueError(f"stage {self.name}: upstream keys missing for {sorted(missing)}")
        module = self.run.__module__
        root = code_root or code_closure.project_root_of(module, sys.modules[module].__file__ or "")
        code = code_closure.closure(module, root)
        inputs = {"libraries": library_versions(code.third_party),
                  **(self.key_inputs(params) if self.key_inputs else {})}
        return stage_key(self.name, code.digest(), self.params_of(params),
                         {u: upstream_keys[u] for u in self.upstream}, inputs)


def _result_from_store(spec: StageSpec, store: ArtifactStore, key: str) -> StageResult | None:
    folder = store.find(spec.name, key)
    if folder is None:
        return None
    verified = VerifiedFiles(store.root)
    try:  # a sealed folder changed since: a clear error, never silent reuse
        store.verify(folder, sha256_of=verified.sha256)
    finally:
        verified.save()
    return StageResult(
        stage=spec.name,
        key=key,
        path=str(folder.path),
        metrics=folder.metrics,
        mlflow_run_id=folder.mlflow_run_id,
        parent_run_id=folder.manifest.get("mlflow_parent_run_id"),
        seconds=float(folder.manifest.get("seconds", 0.0)),
        ran=False,
    )


def lookup(spec: StageSpec, ctx: RunContext, key: str) -> StageResult | None:
    """The finished output of (stage, key) in the store, without running anything."""
    return _result_from_store(spec, ArtifactStore(ctx.store), key)


def dask_worker_name() -> object | None:
    """The name of the Dask worker running this task (its GPU slot, see ``devices.assigned_gpu``); None outside one."""
    try:
        from distributed import get_worker

        return get_worker().name
    except (ImportError, ValueError):  # not inside a Dask worker
        return None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def scratch_dir(store: str | Path, stage: str, key: str) -> Path:
    """The stage's crash-surviving folder (checkpoints) under the store; see :attr:`StageContext.scratch`."""
    return Path(store) / "scratch" / stage / key


def discard_scratch(ctx: RunContext, stage: str, key: str) -> None:
    """Forget what an earlier attempt left in the scratch folder: ``--force`` starts from nothing.

    Why: ``--force train`` is how a user asks for a fresh training; resuming a checkpoint of an earlier
    attempt would hand back that attempt's weights.
    """
    with stage_lock.hold(ctx.store, stage, key, notify=logging.getLogger(f"mammo.{stage}").warning):
        shutil.rmtree(scratch_dir(ctx.store, stage, key), ignore_errors=True)


def still_sealed(result: StageResult) -> bool:
    """True when the folder a (possibly Prefect-cached) result points to still carries its manifest."""
    return (Path(result.path) / "manifest.json").is_file()


def execute(spec: StageSpec, ctx: RunContext, key: str, upstream: dict[str, StageResult]) -> StageResult:
    """Produce (stage, key) unless the store already has it; the body of the Prefect task."""
    stop_request.check(f"the start of stage {spec.name}")  # a stop requested while earlier stages ran
    store = ArtifactStore(ctx.store)
    forced = spec.name in ctx.force
    if not forced:
        found = _result_from_store(spec, store, key)
        if found is not None:
            return found
    try:
        logger: logging.Logger | logging.LoggerAdapter = get_run_logger()
    except Exception:  # called outside a Prefect run (unit tests of a stage)
        logger = logging.getLogger(f"mammo.{spec.name}")
    store.check_final_path(spec.name, key)  # before any work: a folder we must not overwrite is in the way
    # One producer per (stage, key) at a time; a concurrent run of the same key waits here, then reuses.
    with stage_lock.hold(ctx.store, spec.name, key, notify=logger.warning):
        if not forced:
            found = _result_from_store(spec, store, key)
            if found is not None:  # sealed by a concurrent run while this one waited
                logger.info("%s: reusing the folder a concurrent run sealed (MLflow run %s)", spec.name,
                            found.mlflow_run_id)
                return found
        return _produce(spec, ctx, key, upstream, store, forced, logger)


def _produce(spec: StageSpec, ctx: RunContext, key: str, upstream: dict[str, StageResult], store: ArtifactStore,
             forced: bool, logger: logging.Logger | logging.LoggerAdapter) -> StageResult:
    """Run the stage into a temporary folder and seal it (the caller holds the stage's lock)."""
    params = ctx.params
    client = MlflowClient(ctx.tracking_uri)
    run_id = tracking.start_run(
        client,
        ctx.experiment_id,
        spec.name,
        tags={**_stage_tags(spec, ctx, key, cache_hit=False), **{f"upstream.{u}": r.key for u, r in upstream.items()}},
        parent_run_id=ctx.parent_run_id,
    )
    log_params(client, run_id, spec.params_of(params))
    swept = store.sweep_abandoned(spec.name)
    if swept:
        logger.info("%s: removed %d temporary folder(s) left by killed runs", spec.name, swept)
    workdir = store.begin(spec.name, key)
    started = time.perf_counter()
    stage_ctx = StageContext(
        stage=spec.name,
        key=key,
        workdir=workdir,
        params=params,
        upstream=upstream,
        store_root=Path(ctx.store),
        client=client,
        run_id=run_id,
        logger=logger,
    )
    try:
        faults.at(f"stage:{spec.name}:start")
        spec.run(stage_ctx)
        faults.at(f"stage:{spec.name}:end")
        seconds = time.perf_counter() - started
        stage_ctx.log_metric(f"{spec.name}/seconds", seconds)
        extra = {"seconds": seconds, "mlflow_parent_run_id": ctx.parent_run_id}
        if spec.manifest_extra is not None:
            extra.update(spec.manifest_extra(stage_ctx))
        folder = store.seal(
            spec.name,
            key,
            workdir,
            params=spec.params_of(params),
            upstream={u: r.key for u, r in upstream.items()},
            metrics=stage_ctx.metrics,
            mlflow_run_id=run_id,
            extra=extra,
            replace=forced,
        )
        faults.at(f"stage:{spec.name}:sealed")
        client.log_artifact(run_id, str(folder.path / "manifest.json"))
        shutil.rmtree(scratch_dir(ctx.store, spec.name, key), ignore_errors=True)
    except BaseException as exc:
        # the scratch folder (checkpoints of finished epochs) stays: the resume starts from it
        shutil.rmtree(workdir, ignore_errors=True)
        try:
            if isinstance(exc, stop_request.StopRequested):
                tracking.kill_run(client, run_id, str(exc))
            else:
                client.set_tag(run_id, "error", "".join(traceback.format_exception_only(exc)).strip()[:4000])
                tracking.finish_run(client, run_id, ok=False)
        except Exception:
            pass
        raise
    tracking.finish_run(client, run_id, ok=True)
    return StageResult(
        stage=spec.name,
        key=key,
        path=str(folder.path),
        metrics=folder.metrics,
        mlflow_run_id=run_id,
        parent_run_id=ctx.parent_run_id,
        seconds=seconds,
        ran=True,
    )


def log_params(client: MlflowClient, run_id: str, sections: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = str(value)[:6000]

    walk("", sections)
    items = [Param(k, v) for k, v in sorted(flat.items())]
    for i in range(0, len(items), 90):
        client.log_batch(run_id, params=items[i : i + 90])


def _stage_tags(spec: StageSpec, ctx: RunContext, key: str, cache_hit: bool) -> dict[str, str]:
    """Tags every stage child run carries, produced or reused, so the UI can filter and compare them."""
    return {
        "stage": spec.name,
        "stage_key": key,
        "cache_hit": "true" if cache_hit else "false",
        "prefect_flow_run_id": ctx.flow_run_id,
        "params_file": ctx.params_file,
        "git_commit": ctx.git_commit,
    }


def record_cache_hit(spec: StageSpec, ctx: RunContext, result: StageResult) -> str:
    """A child run for a stage reused from an earlier run, carrying its metrics for side-by-side views."""
    client = MlflowClient(ctx.tracking_uri)
    run_id = tracking.start_run(
        client,
        ctx.experiment_id,
        spec.name,
        tags={**_stage_tags(spec, ctx, result.key, cache_hit=True), "source_run_id": result.mlflow_run_id or "",
              "stage_path": result.path},
        parent_run_id=ctx.parent_run_id,
    )
    log_params(client, run_id, spec.params_of(ctx.params))
    tracking.log_metrics(client, run_id, result.metrics)
    tracking.finish_run(client, run_id, ok=True)
    return run_id


@task(cache_policy=NO_CACHE, persist_result=False, retries=0, log_prints=False)
def stage_task(stage: str, ctx: RunContext, key: str, upstream: dict[str, StageResult]) -> StageResult:
    """The Prefect task behind every stage (renamed per stage with ``with_options``).

    No Prefect cache and no persisted result: the store is the cache (``execute`` looks there first), and
    Prefect's result storage would pickle the result into the store and unpickle it on a hit, running
    whatever the pickle says.

    ``log_prints=False``: stages log through their logger; what libraries print (pycocotools' summary
    tables, for one) stays out of the run log, where the flow's ``log_prints`` would otherwise put it.
    """
    from tasks.registry import STAGES

    return execute(STAGES[stage], ctx, key, upstream)


@task(persist_result=False, cache_policy=NO_CACHE)
def cache_hit_task(stage: str, ctx: RunContext, result: StageResult) -> str:
    """Record a reused stage as its own child run (tagged cache_hit=true)."""
    from tasks.registry import STAGES

    return record_cache_hit(STAGES[stage], ctx, result)
