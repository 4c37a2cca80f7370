"""Dependent tasks on one-thread workers (mammo_core.detection.task_graph): every task after what it waits
for, the longest remaining path first, errors raised and nothing left waiting."""

from __future__ import annotations

import threading

import pytest

from mammo_core.detection.task_graph import Task, TaskGraph, critical_paths


def recorder(order: list[str], value=None):
    return lambda name: (lambda results: (order.append(name), value if value is not None else name)[1])


def test_the_critical_path_is_a_tasks_cost_plus_the_longest_path_waiting_on_it():
    tasks = [Task("a", print, (), 1.0), Task("b", print, ("a",), 5.0), Task("c", print, ("a",), 2.0),
             Task("d", print, ("b", "c"), 1.0)]
    assert critical_paths(tasks) == {"a": 7.0, "b": 6.0, "c": 3.0, "d": 1.0}


@pytest.mark.parametrize(("tasks", "error"), [
    ([Task("a", print), Task("a", print)], "unique"),
    ([Task("a", print, ("z",))], "unknown"),
    ([Task("a", print, ("b",)), Task("b", print, ("a",))], "cycle"),
])
def test_malformed_graphs_are_refused_before_anything_runs(tasks, error):
    with pytest.raises(ValueError, match=error):
        critical_paths(tasks)


def test_on_one_worker_ready_tasks_start_longest_path_first_and_after_their_inputs():
    order: list[str] = []
    make = recorder(order)
    tasks = [Task("short", make("short"), (), 1.0), Task("long", make("long"), (), 1.0),
             Task("long2", make("long2"), ("long",), 10.0), Task("join", make("join"), ("short", "long2"), 1.0)]
    results = TaskGraph(tasks).run(1, inference=True)
    assert order == ["long", "long2", "short", "join"]
    assert results == {"short": "short", "long": "long", "long2": "long2", "join": "join"}


def test_tasks_read_the_results_they_wait_for_and_run_on_two_workers():
    threads: set[str] = set()
    barrier = threading.Barrier(2, timeout=30)

    def both_at_once(value):  # only finishes when the two roots really run at the same time
        def run(results):
            threads.add(threading.current_thread().name)
            barrier.wait()
            return value
        return run

    tasks = [Task("x", both_at_once(2)), Task("y", both_at_once(3)),
             Task("sum", lambda r: r["x"] + r["y"], ("x", "y"))]
    assert TaskGraph(tasks).run(2, inference=False)["sum"] == 5
    assert len(threads) == 2 and all(t.startswith("mammo-worker") for t in threads)


def test_a_failing_task_raises_and_the_tasks_waiting_for_it_never_run():
    ran: list[str] = []

    def fail(results):
        raise RuntimeError("segment 3 failed")

    tasks = [Task("bad", fail), Task("ok", lambda r: ran.append("ok")),
             Task("after_bad", lambda r: ran.append("after_bad"), ("bad",))]
    with pytest.raises(RuntimeError, match="segment 3 failed"):
        TaskGraph(tasks).run(2, inference=True)
    assert "after_bad" not in ran
