"""The end-to-end Prefect flow: stage order and hand-over of stage results, nothing else.

Stages are submitted as soon as their upstream futures exist, straight from ``registry.ORDER`` and each
spec's ``upstream``: under a parallel task runner (``run.task_runner: dask`` or ``process``) independent
branches (detect, baselines, the hashing branch) run at the same time; under the default thread runner
they run one after the other in the flow's own thread (see :func:`run_stages` for why).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow

from flows import interrupts, progress
from flows.run_clock import PlannedStage, previous_seconds
from flows.runners import build_task_runner, ensure_gpu_limits, gpu_slots
from mammo_core.config import Params
from mammo_core.runtime import stop_request
from mammo_core.storage.store import ArtifactStore
from tasks import registry, runtime
from tasks.run_tracking import close_run, open_run
from tasks.stages.report import report_task


class PipelineFailed(RuntimeError):
    """A stage failed; carries the outcome table, the failed stage and the MLflow parent run to resume."""

    def __init__(self, message: str, stage: str, outcomes: list[dict], parent_run_id: str | None = None,
                 stopped_by: str | None = None):
        super().__init__(message, stage, outcomes, parent_run_id)
        self.message = message
        self.stage = stage
        self.outcomes = outcomes
        self.parent_run_id = parent_run_id
        self.stopped_by = stopped_by  # the signal's name when the user stopped the run (Ctrl-C, SIGTERM)

    def __str__(self) -> str:
        return f"stage {self.stage} failed: {self.message}"


def plan(selected: list[str] | None) -> tuple[set[str], set[str]]:
    """(stages to run, stages only looked up in the store because a selected stage needs them)."""
    run = set(selected) if selected else {s.name for s in registry.ORDER}
    needed: set[str] = set()
    for name in run:
        needed |= registry.ancestors(name)
    return run, needed - run


def _submit_branch_trainings(ctx: runtime.RunContext, params: Params, key: str, upstream: dict) -> list:
    """``separate`` training on Dask: three tasks, each asking the scheduler for one ``GPU`` resource."""
    import dask

    from tasks.stages import train

    slots = gpu_slots(params.run)
    if slots:
        ensure_gpu_limits(slots)
    annotations = {"resources": {"GPU": 1}} if params.run.gpus else {}
    futures = []
    for branch in train.branch_names(params):
        with dask.annotate(**annotations):
            futures.append(train.branch_task.with_options(task_run_name=f"train-{branch}").submit(
                ctx, key, upstream, branch))
    return futures


def _split_training(params: Params, ctx: runtime.RunContext, name: str, key: str) -> bool:
    return (name == "train" and params.run.task_runner == "dask" and params.train.mode == "separate"
            and (name in ctx.force or runtime.lookup(registry.STAGES[name], ctx, key) is None))


def run_stages(ctx: runtime.RunContext, stages: list[str] | None, sequential: bool = True) -> list[dict]:
    """Run every selected stage in DAG order, reusing sealed ones; return the outcome table.

    ``sequential`` (the thread runner) runs the stages one after the other in this thread: one stage at a
    time, as on a laptop, where two trainings at once would only fight over the same cores. In this thread,
    not on the task runner's worker threads: with spinning OpenMP waits (exported by whoever owns the cores,
    :mod:`mammo_core.runtime.openmp_wait`) PyTorch's CPU ops lose much of their second thread on a fresh
    thread once another thread of the process has run them; a training step of the fused network took
    1.44-1.52x as long there (``bench/stage_thread.py``). Under the default passive waits the two threads were
    equally fast (0.90x), and the default run took as long either way. Parallel runners (``dask``,
    ``process``) submit every stage as soon as its upstream futures exist, so that independent branches
    overlap.

    Progress events (``flows.progress``) follow DAG order: a stage "starts" when the previous one in DAG
    order has been collected, which in sequential mode is when it really starts.
    """
    params = ctx.params
    to_run, to_lookup = plan(stages)
    keys = registry.stage_keys(params)
    sealed_before = {spec.name: spec.name not in ctx.force and runtime.lookup(spec, ctx, keys[spec.name]) is not None
                     for spec in registry.ORDER if spec.name in to_run}
    store = ArtifactStore(ctx.store)
    progress.planned([PlannedStage(spec.name, sealed_before[spec.name],
                                   previous_seconds(store, spec.name, spec.params_of(params)))
                      for spec in registry.ORDER if spec.name in to_run])
    results = _look_up_needed(ctx, to_lookup, keys)  # stage -> StageResult, or a Prefect future once submitted
    selected = [spec for spec in registry.ORDER if spec.name in to_run]
    for spec in selected:
        if spec.name in ctx.force:
            runtime.discard_scratch(ctx, spec.name, keys[spec.name])
    outcomes: list[dict] = []
    if sequential:
        for spec in selected:
            _collect(ctx, spec, keys[spec.name], lambda spec=spec: _run_here(ctx, spec, keys[spec.name], results),
                     results, outcomes)
        return outcomes
    for spec in selected:
        key = keys[spec.name]
        upstream = {u: results[u] for u in spec.upstream}
        wait_for = _submit_branch_trainings(ctx, params, key, upstream) if _split_training(
            params, ctx, spec.name, key) else []
        task = runtime.stage_task.with_options(name=spec.name, task_run_name=spec.name)
        results[spec.name] = task.submit(spec.name, ctx, key, upstream, wait_for=wait_for or None)
    for spec in selected:
        _collect(ctx, spec, keys[spec.name], results[spec.name].result, results, outcomes)
    return outcomes


def _look_up_needed(ctx: runtime.RunContext, names: set[str], keys: dict[str, str]) -> dict[str, Any]:
    """The sealed results of the stages the selection needs but does not run; a clear error when one is missing."""
    found: dict[str, Any] = {}
    for spec in registry.ORDER:
        if spec.name not in names:
            continue
        result = runtime.lookup(spec, ctx, keys[spec.name])
        if result is None:
            raise PipelineFailed(
                f"{spec.name} (key {keys[spec.name]}) has not finished; it is needed by the selected stages: "
                f"run it first (drop --only/--from)", spec.name,
                [{"stage": spec.name, "status": "failed", "seconds": 0.0, "key": keys[spec.name], "path": ""}],
            )
        found[spec.name] = result
    return found


def _run_here(ctx: runtime.RunContext, spec: runtime.StageSpec, key: str, results: dict[str, Any]) -> Any:
    """Call the stage's Prefect task in this thread (a task run all the same) and keep its result."""
    task = runtime.stage_task.with_options(name=spec.name, task_run_name=spec.name)
    results[spec.name] = task(spec.name, ctx, key, {u: results[u] for u in spec.upstream})
    return results[spec.name]


def _collect(ctx: runtime.RunContext, spec: runtime.StageSpec, key: str, get_result: Callable[[], Any],
             results: dict[str, Any], outcomes: list[dict]) -> None:
    """Add one stage's outcome row: wait for (or run) it, record a reuse; PipelineFailed when it failed."""
    progress.started(spec.name)
    try:
        result: runtime.StageResult = get_result()
    except Exception as exc:
        stopped_by = stop_request.reason() or None
        status = "stopped" if stopped_by else "failed"
        progress.finished(spec.name, status)
        outcomes.append({"stage": spec.name, "status": status, "seconds": 0.0, "key": key, "path": ""})
        _drain(results)
        raise PipelineFailed(_root_message(exc), spec.name, outcomes, ctx.parent_run_id, stopped_by) from exc
    if result.parent_run_id != ctx.parent_run_id:
        runtime.cache_hit_task.with_options(task_run_name=f"{spec.name}-cache-hit")(spec.name, ctx, result)
        if spec.name == "report":  # the parent run carries the report even when it is reused
            report_task(ctx, result)
    # not ran: sealed before this run, or by a concurrent run while this one waited for the stage's lock
    status = "ran" if result.ran else "cached"
    progress.finished(spec.name, status, result.seconds if status == "ran" else None)
    outcomes.append({"stage": spec.name, "status": status, "seconds": result.seconds, "key": key,
                     "path": result.path})


def _drain(results: dict[str, Any]) -> None:
    """Wait for stages still running elsewhere (a sibling branch) so nothing writes after the flow ends."""
    for value in results.values():
        if hasattr(value, "wait"):
            value.wait()


def _root_message(exc: BaseException) -> str:
    """The failing stage's own error, not Prefect's 'upstream task failed' wrapper."""
    return str(exc) or type(exc).__name__


# result_serializer="json": a flow's persisted result (the outcome table) is plain JSON, never a pickle.
@flow(name="mammo-stage-graph", log_prints=True, result_serializer="json")
def stage_graph(ctx: runtime.RunContext, stages: list[str] | None) -> list[dict]:
    """The stage graph as a sub-flow, so that it can carry a task runner chosen from the params."""
    interrupts.reinstall()  # the sub-flow's engine put Prefect's SIGTERM handler back
    return run_stages(ctx, stages, sequential=False)


@flow(name="mammo-pipeline", log_prints=True, validate_parameters=True, result_serializer="json")
def pipeline(
    params_file: str | None = None,
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: list[str] | None = None,
    store: str | None = None,
    resume: str | None = None,
) -> list[dict]:
    """Run the selected stages in DAG order; finished stages with the same key are reused.

    ``resume`` is the MLflow parent run id of a failed run: that run is reopened and the stages continue
    inside it, so the tracking UI shows one run whose failed stage was retried.
    """
    interrupts.reinstall()
    ctx = open_run(params_file, list(overrides or []), store, list(force or []), stages, resume)
    params = ctx.params
    runner = build_task_runner(params.run)
    try:
        if runner is None:
            outcomes = run_stages(ctx, stages)
        else:
            outcomes = stage_graph.with_options(task_runner=runner)(ctx, stages)
    except PipelineFailed as exc:
        exc.parent_run_id = ctx.parent_run_id
        exc.stopped_by = exc.stopped_by or stop_request.reason() or None
        close_run(ctx, ok=False, outcomes=exc.outcomes, stopped_by=exc.stopped_by)
        raise
    except Exception as exc:
        stopped_by = stop_request.reason() or None
        failed = [{"stage": "?", "status": "stopped" if stopped_by else "failed", "seconds": 0.0, "key": "",
                   "path": ""}]
        close_run(ctx, ok=False, outcomes=failed, stopped_by=stopped_by)
        raise PipelineFailed(str(exc), "?", failed, ctx.parent_run_id, stopped_by) from exc
    close_run(ctx, ok=True, outcomes=outcomes)
    return outcomes
