"""Progress of a ``mammo run`` for the person running it: a live display in a terminal, plain lines in a log.

The flow (``flows.pipeline.run_stages``) announces three events: the plan (which stages run, which are
reused), a stage starting and a stage ending. Whoever started the run (the CLI) decides how to show them by
installing a reporter with :func:`reporting`; without one the events go nowhere, so a flow started by a
Prefect worker or a test behaves as before. Why a module-level hook instead of a flow parameter: Prefect
validates and records flow parameters, and a console object is neither data nor serialisable.

Both reporters say, per stage, its place in the run, what it is for (``run_clock.PURPOSE``), how long it
and the run have taken, and about how long is left (``run_clock.RunClock``). The plain reporter also
writes a "still running" line every ``heartbeat_s`` so a CI log or ``nohup.out`` never looks stuck.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.text import Text

from flows.run_clock import PURPOSE, PlannedStage, RunClock, exact


class Reporter(Protocol):
    def planned(self, stages: list[PlannedStage]) -> None: ...
    def started(self, stage: str) -> None: ...
    def finished(self, stage: str, status: str, seconds: float | None = None) -> None: ...
    def close(self) -> None: ...


_reporter: Reporter | None = None


@contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Send this process's run events to ``reporter`` until the block ends (then close it)."""
    global _reporter
    _reporter = reporter
    try:
        yield reporter
    finally:
        _reporter = None
        reporter.close()


def planned(stages: list[PlannedStage]) -> None:
    if _reporter is not None:
        _reporter.planned(stages)


def started(stage: str) -> None:
    if _reporter is not None:
        _reporter.started(stage)


def finished(stage: str, status: str, seconds: float | None = None) -> None:
    """``seconds``: the stage's own measured time when it ran (the collection loop may reach it late)."""
    if _reporter is not None:
        _reporter.finished(stage, status, seconds)


def plan_summary(clock: RunClock) -> str:
    reused = sum(s.cached for s in clock.stages)
    return (f"mammo run: {len(clock.stages)} stages, {reused} reused from earlier runs, "
            f"{len(clock.stages) - reused} to run; {clock.describe_remaining()}")


def started_line(clock: RunClock, stage: str) -> str:
    spec = next(s for s in clock.stages if s.name == stage)
    if spec.cached:
        return f"[{clock.position(stage)}] {stage} - reused from an earlier run (same code, params and inputs)"
    return (f"[{clock.position(stage)}] {stage} - {PURPOSE.get(stage, '')} | run {exact(clock.elapsed())}, "
            f"{clock.describe_remaining()}")


def running_line(clock: RunClock, stage: str) -> str:
    return (f"[{clock.position(stage)}] {stage} - still running, {exact(clock.stage_elapsed(stage))} in this stage"
            f" | run {exact(clock.elapsed())}, {clock.describe_remaining()}")


def finished_line(clock: RunClock, stage: str, status: str, took: float) -> str:
    if status == "failed":
        return f"[{clock.position(stage)}] {stage} - FAILED after {exact(took)}"
    verb = "reused" if status == "cached" else "done"
    return (f"[{clock.position(stage)}] {stage} - {verb} in {exact(took)} | run {exact(clock.elapsed())}, "
            f"{clock.describe_remaining()}")


class PlainReporter:
    """One line per event (and a heartbeat line), for logs: CI, ``nohup``, a pipe."""

    def __init__(self, write: Callable[[str], None], now: Callable[[], float] = time.monotonic,
                 heartbeat_s: float = 60.0):
        self._write = write
        self._now = now
        self._heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._running: str | None = None
        self._thread: threading.Thread | None = None
        self.clock: RunClock | None = None

    def planned(self, stages: list[PlannedStage]) -> None:
        self.clock = RunClock(stages, self._now)
        self._emit(plan_summary(self.clock))
        if self._heartbeat_s > 0:
            self._thread = threading.Thread(target=self._beat, name="mammo-progress", daemon=True)
            self._thread.start()

    def started(self, stage: str) -> None:
        if self.clock is None:
            return
        with self._lock:
            self.clock.start(stage)
            self._running = None if next(s for s in self.clock.stages if s.name == stage).cached else stage
            self._write(started_line(self.clock, stage))

    def finished(self, stage: str, status: str, seconds: float | None = None) -> None:
        if self.clock is None:
            return
        with self._lock:
            took = self.clock.finish(stage, seconds)
            self._running = None
            self._write(finished_line(self.clock, stage, status, took))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _emit(self, line: str) -> None:
        with self._lock:
            self._write(line)

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            with self._lock:
                if self._running is not None and self.clock is not None:
                    self._write(running_line(self.clock, self._running))


class _ClockColumn(ProgressColumn):
    """A column computed from the run clock at every refresh, so elapsed and left tick while a stage runs."""

    def __init__(self, text: Callable[[], str]):
        super().__init__()
        self._text = text

    def render(self, task: Task) -> Text:
        return Text(self._text(), style="progress.remaining")


class RichReporter:
    """A live display in a terminal: the current stage and its purpose, a bar over the stages, time taken and
    about how long is left; each finished stage leaves one line above it."""

    def __init__(self, console: Console, now: Callable[[], float] = time.monotonic):
        self._console = console
        self._now = now
        self.clock: RunClock | None = None
        self._current: str | None = None
        self._progress: Progress | None = None
        self._task = None
        self._swapped: list[tuple[object, object]] = []

    def planned(self, stages: list[PlannedStage]) -> None:
        self.clock = clock = RunClock(stages, self._now)
        self._console.print(plan_summary(clock), highlight=False)
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
            _ClockColumn(self.status_text), console=self._console, transient=True,
            redirect_stdout=True, redirect_stderr=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("starting", total=len(stages))
        self._route_prefect_console_logs()

    def started(self, stage: str) -> None:
        if self.clock is None or self._progress is None:
            return
        self.clock.start(stage)
        self._current = stage
        what = "reused from an earlier run" if next(s for s in self.clock.stages if s.name == stage).cached \
            else PURPOSE.get(stage, "")
        self._progress.update(self._task, description=f"[bold]{stage}[/] [dim]{what}[/]")

    def finished(self, stage: str, status: str, seconds: float | None = None) -> None:
        if self.clock is None or self._progress is None:
            return
        took = self.clock.finish(stage, seconds)
        self._current = None
        mark = {"ran": "[green]done[/]", "cached": "[cyan]reused[/]"}.get(status, "[bold red]FAILED[/]")
        self._progress.console.print(f"[{self.clock.position(stage)}] {stage} {mark} in {exact(took)}",
                                     highlight=False)
        self._progress.advance(self._task)

    def close(self) -> None:
        for handler, file in self._swapped:
            handler.console.file = file  # type: ignore[attr-defined]
        self._swapped.clear()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def status_text(self) -> str:
        if self.clock is None:
            return ""
        stage = f"stage {exact(self.clock.stage_elapsed(self._current))} · " if self._current else ""
        return f"{stage}run {exact(self.clock.elapsed())} · {self.clock.describe_remaining()}"

    def _route_prefect_console_logs(self) -> None:
        """Prefect's console handler keeps the stderr it was configured with; point it at the live display's
        proxy instead, so its log lines scroll above the display rather than through it."""
        loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                          if isinstance(lg, logging.Logger))]
        for logger in loggers:
            for handler in logger.handlers:
                console = getattr(handler, "console", None)
                if isinstance(console, Console) and console.file is not sys.stderr:
                    self._swapped.append((handler, console.file))
                    console.file = sys.stderr
