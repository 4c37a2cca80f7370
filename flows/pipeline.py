"""The end-to-end Prefect flow: stage order and hand-over of stage results, nothing else."""

from __future__ import annotations

from prefect import flow

from mammo_core.config import Params
from tasks import registry, runtime
from tasks.report import report_task
from tasks.run_tracking import close_run, open_run


class PipelineFailed(RuntimeError):
    """A stage failed; carries the per-stage outcome table and the failed stage's name."""

    def __init__(self, message: str, stage: str, outcomes: list[dict]):
        super().__init__(message, stage, outcomes)
        self.message = message
        self.stage = stage
        self.outcomes = outcomes

    def __str__(self) -> str:
        return f"stage {self.stage} failed: {self.message}"


def plan(selected: list[str] | None) -> tuple[set[str], set[str]]:
    """(stages to run, stages only looked up in the store because a selected stage needs them)."""
    run = set(selected) if selected else {s.name for s in registry.ORDER}
    needed: set[str] = set()
    for name in run:
        needed |= registry.ancestors(name)
    return run, needed - run


@flow(name="mammo-pipeline", log_prints=True, validate_parameters=True)
def pipeline(
    params_file: str | None = None,
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: list[str] | None = None,
    store: str | None = None,
) -> list[dict]:
    """Run the selected stages in DAG order; finished stages with the same key are reused."""
    ctx = open_run(params_file, list(overrides or []), store, list(force or []))
    params = Params.model_validate(ctx.params)
    to_run, to_lookup = plan(stages)
    keys: dict[str, str] = {}
    results: dict[str, runtime.StageResult] = {}
    outcomes: list[dict] = []
    current = ""
    try:
        keys = registry.stage_keys(params)
        for spec in registry.ORDER:
            current = spec.name
            key = keys[spec.name]
            if spec.name in to_lookup:
                found = runtime.lookup(spec, ctx, key)
                if found is None:
                    raise RuntimeError(
                        f"{spec.name} (key {key}) has not finished; it is needed by the selected stages: "
                        f"run it first (drop --only/--from)"
                    )
                results[spec.name] = found
                continue
            if spec.name not in to_run:
                continue
            upstream = {u: results[u] for u in spec.upstream}
            task = runtime.stage_task.with_options(
                name=spec.name,
                task_run_name=spec.name,
                refresh_cache=spec.name in ctx.force,
            )
            result = task(spec.name, ctx, key, upstream)
            if not runtime.still_sealed(result):  # Prefect remembered a folder the store no longer has
                result = task.with_options(refresh_cache=True)(spec.name, ctx, key, upstream)
            if result.parent_run_id != ctx.parent_run_id:
                runtime.cache_hit_task.with_options(task_run_name=f"{spec.name}-cache-hit")(spec.name, ctx, result)
                if spec.name == "report":  # the parent run carries the report even when it is reused
                    report_task(ctx, result)
                status = "cached"
            else:
                status = "ran"
            results[spec.name] = result
            outcomes.append({"stage": spec.name, "status": status, "seconds": result.seconds, "key": key,
                             "path": result.path})
    except Exception as exc:
        outcomes.append({"stage": current, "status": "failed", "seconds": 0.0, "key": keys.get(current, ""),
                         "path": ""})
        close_run(ctx, ok=False, outcomes=outcomes)
        raise PipelineFailed(str(exc), current, outcomes) from exc
    close_run(ctx, ok=True, outcomes=outcomes)
    return outcomes
