"""MLflow tracking for pipeline runs: one parent run per ``mammo run``, one child run per stage.

Everything goes through an explicit ``MlflowClient`` and run ids, never the fluent API's implicit
"active run": stages run in Prefect worker threads (or processes), where a thread-local active run
would attach metrics to the wrong run.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Run, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from mammo_core.runtime import faults

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
_MAX_BATCH = 900
# MLflow's experiment kind (the values its UI offers: mlflow/server/js, ExperimentKind); "custom model
# development" is what the UI calls "Machine learning" and opens on the run table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
HOST_TAG = "mammo.host"
PID_TAG = "mammo.pid"
ENDED_BY_TAG = "ended_by"

# The runs this process opened and has not ended yet (run id -> (client, is a parent run)): what an
# interrupt that cannot wait for the stages (flows/interrupts.py) marks KILLED before the process exits.
_open_runs: dict[str, tuple[MlflowClient, bool]] = {}
_open_runs_lock = threading.Lock()
_parent_runs: list[str] = []  # every parent run this process opened or reopened, the latest last


def _opened(client: MlflowClient, run_id: str, parent: bool) -> None:
    with _open_runs_lock:
        _open_runs[run_id] = (client, parent)
        if parent:
            _parent_runs.append(run_id)


def _ended(run_id: str) -> None:
    with _open_runs_lock:
        _open_runs.pop(run_id, None)


def default_tracking_uri(store: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else the embedded SQLite store under the artifact store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(store).resolve() / 'mlflow.db'}"


def open_client(uri: str, store: Path) -> MlflowClient:
    """A client whose backend is ready; the embedded SQLite store is created under a file lock.

    MLflow creates and migrates a new SQLite database on first use; two ``mammo run`` processes starting
    on a fresh store at once both try, and the loser fails with "table ... already exists". The lock makes
    the first one create it and the second find it.
    """
    install_db_write_fault_point()
    if not uri.startswith("sqlite:"):
        return MlflowClient(uri)
    Path(store).mkdir(parents=True, exist_ok=True)
    with open(Path(store) / ".mlflow-init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)  # creates/migrates the database inside the lock
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    """The experiment id for ``name``, created with its artifact root under the store when new.

    The experiment is marked as model training (:data:`EXPERIMENT_KIND_TAG`): without the mark, MLflow 3's
    UI opens an experiment on its GenAI overview (traces, token usage), where none of our runs show.
    An experiment made before the mark gets it; a kind someone chose in the UI is left as it is.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return experiment.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    except Exception:  # created concurrently by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
) -> str:
    all_tags = {RUN_NAME_TAG: name, **{k: str(v) for k, v in tags.items()}, **owner_tags()}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    _opened(client, run.info.run_id, parent=not parent_run_id)
    return run.info.run_id


def owner_tags() -> dict[str, str]:
    """Which process runs an MLflow run: lets a later run tell a live run from one whose process was killed."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_orphaned_runs(client: MlflowClient, experiment_id: str,
                        sealed_manifest: Callable[[Run], Path | None] | None = None) -> list[str]:
    """End the runs still RUNNING whose process (on this host) is gone; returns their ids.

    Why: a SIGKILLed ``mammo run`` cannot end its MLflow runs, which would show as running forever in the
    UI. Runs of live processes (a concurrent ``mammo run``) and of other hosts are left alone. A stage run
    whose folder was sealed before the kill (``sealed_manifest`` returns its manifest) had logged all its
    metrics: it gets its manifest artifact and FINISHED, like an uninterrupted one; the others are KILLED.
    """
    host = socket.gethostname().replace("'", "")
    runs = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    closed = []
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and not _alive(int(pid)):
            manifest = sealed_manifest(run) if sealed_manifest is not None else None
            if manifest is not None:
                client.log_artifact(run.info.run_id, str(manifest))
                client.set_tag(run.info.run_id, "ended_by", "sealed before its process was killed; finished by a "
                                                            "later mammo run")
                finish_run(client, run.info.run_id, ok=True)
            else:
                client.set_tag(run.info.run_id, "ended_by", "its process is gone (killed); marked by a later "
                                                            "mammo run")
                client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
            closed.append(run.info.run_id)
    return closed


LOCKED_RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)


def _chain_mentions(exc: BaseException, *texts: str) -> bool:
    """True when ``exc`` or an exception it was raised from says one of ``texts`` (MLflow and SQLAlchemy wrap)."""
    seen: BaseException | None = exc
    while seen is not None:
        if any(text in str(seen) for text in texts):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_database_locked(exc: BaseException) -> bool:
    """True for SQLite's "database is locked", however MLflow and SQLAlchemy wrapped it."""
    return _chain_mentions(exc, "database is locked")


def _retry_when_locked(call: Callable[[], object], what: str) -> None:
    """Run ``call``; on "database is locked" retry with growing pauses before giving up.

    Why: SQLite allows one writer; a concurrent ``mammo run`` (or the MLflow UI) holding a long write can
    outlast MLflow's own 20 s busy timeout. Losing a metric for that must not abort an hour of training.
    """
    for delay in (*LOCKED_RETRY_DELAYS_S, None):
        try:
            call()
            return
        except Exception as exc:
            if delay is None or not is_database_locked(exc):
                raise
            logging.getLogger("mammo.tracking").warning("%s: the tracking database is locked; retrying in "
                                                        "%.1f s", what, delay)
            time.sleep(delay)


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log many metrics in batches (one round trip per batch, not per metric); retried while locked."""
    now = get_current_time_millis()
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    faults.at("mlflow:log")
    for i in range(0, len(items), _MAX_BATCH):
        batch = items[i : i + _MAX_BATCH]
        _retry_when_locked(lambda batch=batch: client.log_batch(run_id, metrics=batch), f"metrics of run {run_id}")


def install_db_write_fault_point() -> None:
    """Call :func:`mammo_core.runtime.faults.at` ("mlflow:db-write") inside every SQL write to an MLflow SQLite file.

    Only when ``MAMMO_FAULT`` names that point (the tests): the point sits after the statement ran and
    before its transaction commits, so a kill there dies inside a database write.
    """
    if "mlflow:db-write" not in os.environ.get(faults.ENV, ""):
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "after_cursor_execute", _after_sql_execute):
        event.listen(Engine, "after_cursor_execute", _after_sql_execute)


def _after_sql_execute(conn, _cursor, statement: str, _parameters, _context, _executemany) -> None:
    if str(conn.engine.url.database or "").endswith("mlflow.db") and statement.lstrip()[:6].upper() in (
            "INSERT", "UPDATE", "DELETE"):
        faults.at("mlflow:db-write")


def is_concurrent_dataset_insert(exc: BaseException) -> bool:
    """True when another process inserted the same (experiment, name, digest) dataset row first.

    MLflow's SQL store looks the dataset up and inserts it when absent, two steps without a lock; two
    ``mammo run`` processes logging the same table (same name and content) at once can both find it absent.
    """
    return _chain_mentions(exc, "UNIQUE constraint failed: datasets.", '"dataset_pk"')  # SQLite, PostgreSQL


def log_file_dataset(client: MlflowClient, run_id: str, path: Path, name: str, context: str) -> None:
    """Record a produced table as an MLflow dataset input (digest = sha256 of the file).

    Why the second try: when a concurrent run won the race to insert the same dataset row, the losing
    transaction rolled back whole; trying again finds that row and only links it to this run.
    """
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    dataset = Dataset(name=name, digest=digest, source_type="local", source=Path(path).resolve().as_uri())
    inputs = [DatasetInput(dataset=dataset, tags=[InputTag("mlflow.data.context", context)])]
    for last_try in (False, True):
        try:
            _retry_when_locked(lambda: client.log_inputs(run_id, datasets=inputs), f"dataset {name} of run {run_id}")
            return
        except Exception as exc:
            if last_try or not is_concurrent_dataset_insert(exc):
                raise
            logging.getLogger("mammo.tracking").info("dataset %s: a concurrent run recorded it first; linking "
                                                     "that record to run %s", name, run_id)


def finish_run(client: MlflowClient, run_id: str, ok: bool) -> None:
    status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
    client.set_terminated(run_id, status=status)
    _ended(run_id)


def kill_run(client: MlflowClient, run_id: str, reason: str) -> None:
    """End a run as KILLED (the user stopped it), saying why in its ``ended_by`` tag."""
    client.set_tag(run_id, ENDED_BY_TAG, reason)
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.KILLED))
    _ended(run_id)


def latest_parent_run() -> str | None:
    """The parent run this process opened last (the one to resume), ended or not; None before any."""
    with _open_runs_lock:
        return _parent_runs[-1] if _parent_runs else None


def kill_open_runs(reason: str) -> list[str]:
    """Mark every run this process still holds open KILLED, stage runs before their parent; their ids."""
    with _open_runs_lock:
        runs = sorted(_open_runs.items(), key=lambda item: item[1][1])  # children (False) first
    for run_id, (client, _) in runs:
        kill_run(client, run_id, reason)
    return [run_id for run_id, _ in runs]


def reopen_run(client: MlflowClient, run_id: str, flow_run_id: str) -> str:
    """Set a finished or failed parent run back to RUNNING so a resumed ``mammo run`` continues inside it.

    Why: the UI then shows one run per pipeline execution, with the failed stage's child run next to the
    retried one, instead of a second parent that holds half of the stages.
    """
    run = client.get_run(run_id)
    if run.data.tags.get(PARENT_TAG):
        raise ValueError(f"run {run_id} is a stage run; resume its parent {run.data.tags[PARENT_TAG]}")
    attempts = int(run.data.tags.get("resume_count", "0")) + 1
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    for key, value in owner_tags().items():
        client.set_tag(run_id, key, value)
    client.set_tag(run_id, "resume_count", str(attempts))
    client.set_tag(run_id, f"prefect_flow_run_id.resume{attempts}", flow_run_id)
    _opened(client, run_id, parent=True)
    return run_id
