"""The thread runner's stage loop (``flows.pipeline.run_stages`` with ``sequential``): every stage runs in the
flow's own thread, one after the other in DAG order, each given its upstream stages' results; the first
failure stops the run with the outcome rows so far.

Why the thread matters: with spinning OpenMP waits, PyTorch's CPU ops lose much of their second thread when
more than one thread of the process has run them (``bench/stage_thread.py`` measures it), and the task runner
would give every stage a worker thread of its own. The Prefect task is replaced by a recorder here; the real
flow around it is covered by the end-to-end runs (``tests/e2e/test_pipeline_e2e.py``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flows import pipeline
from mammo_core.config import load_params
from tasks import registry, runtime
from tests.helpers.paths import SMOKE


@dataclass
class RecordingTask:
    """Stands in for ``runtime.stage_task``: runs nothing, records where and with what it was called."""

    fail_at: str | None = None
    calls: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)  # (stage, thread, upstream names)

    def with_options(self, **_options: Any) -> RecordingTask:
        return self

    def __call__(self, stage: str, ctx: runtime.RunContext, key: str, upstream: dict) -> runtime.StageResult:
        assert all(isinstance(result, runtime.StageResult) for result in upstream.values())
        self.calls.append((stage, threading.current_thread().name, tuple(sorted(upstream))))
        if stage == self.fail_at:
            raise ValueError(f"{stage} broke")
        return runtime.StageResult(stage, key, f"/store/{stage}", {}, None, ctx.parent_run_id, 1.5, True)

    def submit(self, *_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the thread runner must not hand a stage to a worker thread")


def _context(tmp_path: Path) -> runtime.RunContext:
    return runtime.RunContext(store=str(tmp_path), params=load_params(SMOKE), params_file=str(SMOKE),
                              tracking_uri="", experiment_id="0", parent_run_id="parent", flow_run_id="flow",
                              git_commit="")


@pytest.fixture
def nothing_sealed(monkeypatch):
    monkeypatch.setattr(runtime, "lookup", lambda spec, ctx, key: None)


def test_stages_run_in_the_flow_thread_in_dag_order_with_their_upstream(tmp_path, monkeypatch, nothing_sealed):
    task = RecordingTask()
    monkeypatch.setattr(runtime, "stage_task", task)
    outcomes = pipeline.run_stages(_context(tmp_path), None)
    names = [spec.name for spec in registry.ORDER]
    assert [call[0] for call in task.calls] == names
    assert {call[1] for call in task.calls} == {threading.current_thread().name}
    assert all(call[2] == tuple(sorted(registry.STAGES[call[0]].upstream)) for call in task.calls)
    assert [(row["stage"], row["status"], row["seconds"]) for row in outcomes] == [(n, "ran", 1.5) for n in names]


def test_the_first_failure_stops_the_run_with_the_rows_so_far(tmp_path, monkeypatch, nothing_sealed):
    task = RecordingTask(fail_at="features")
    monkeypatch.setattr(runtime, "stage_task", task)
    with pytest.raises(pipeline.PipelineFailed, match="features broke") as failed:
        pipeline.run_stages(_context(tmp_path), None)
    assert [call[0] for call in task.calls] == ["acquire", "curate", "patches", "augment", "train", "features"]
    assert failed.value.stage == "features"
    assert [(row["stage"], row["status"]) for row in failed.value.outcomes] == [
        ("acquire", "ran"), ("curate", "ran"), ("patches", "ran"), ("augment", "ran"), ("train", "ran"),
        ("features", "failed")]


def test_a_selected_stage_gets_its_sealed_ancestors_from_the_store(tmp_path, monkeypatch):
    sealed = {name: runtime.StageResult(name, "k", f"/old/{name}", {}, None, "parent", 0.0, False)
              for name in registry.ancestors("hashing")}
    monkeypatch.setattr(runtime, "lookup", lambda spec, ctx, key: sealed.get(spec.name))
    task = RecordingTask()
    monkeypatch.setattr(runtime, "stage_task", task)
    outcomes = pipeline.run_stages(_context(tmp_path), ["hashing"])
    assert task.calls == [("hashing", threading.current_thread().name, ("features", "patches"))]
    assert [row["stage"] for row in outcomes] == ["hashing"]
