"""What ``mammo run`` tells its user while it runs: stage, purpose, time taken, about how long is left, and
where the results are at the end (flows/run_clock.py, flows/progress.py, the closing lines of flows/cli.py)."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
from rich.console import Console

from flows.progress import PlainReporter, RichReporter
from flows.run_clock import PURPOSE, REFERENCE_SECONDS, PlannedStage, RunClock, about, exact, previous_seconds
from mammo_core.storage.store import ArtifactStore
from tasks.registry import ORDER

STAGES = [spec.name for spec in ORDER]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_every_stage_has_a_purpose_and_a_reference_share():
    assert set(PURPOSE) == set(STAGES)
    assert set(REFERENCE_SECONDS) == set(STAGES)
    assert all(len(text) > 20 for text in PURPOSE.values())


def test_durations_read_as_a_person_would_say_them():
    assert [about(s) for s in (3, 44, 61, 749, 3900)] == [
        "about 10 s", "about 40 s", "about 1 min", "about 12 min", "about 1 h 5 min"]
    assert [exact(s) for s in (8.4, 192, 3725)] == ["8 s", "3 min 12 s", "1 h 02 min"]


def test_recorded_durations_give_the_estimate_and_it_counts_down():
    clock = FakeClock()
    run = RunClock([PlannedStage("acquire", cached=True), PlannedStage("curate", False, 100.0),
                    PlannedStage("train", False, 500.0)], clock)
    assert run.remaining() == 600.0
    run.start("acquire")
    run.finish("acquire")
    run.start("curate")
    clock.t += 40
    assert run.remaining() == 560.0 and run.describe_remaining() == "about 9 min left"
    clock.t += 200  # curate overruns: the estimate never goes below what the next stages need
    assert run.remaining() == 500.0
    assert run.finish("curate", seconds=95.0) == 95.0  # the stage's own measurement wins over the wall clock
    assert run.position("train") == "3/3"


def test_without_history_the_estimate_waits_for_a_finished_stage_then_scales_the_reference():
    clock = FakeClock()
    run = RunClock([PlannedStage(name, cached=False) for name in ("acquire", "curate", "train")], clock)
    assert run.remaining() is None
    assert "once the first stage has finished" in run.describe_remaining()
    run.start("acquire")
    clock.t += REFERENCE_SECONDS["acquire"] / 2  # this machine runs at twice the reference speed
    run.finish("acquire")
    expected = (REFERENCE_SECONDS["curate"] + REFERENCE_SECONDS["train"]) / 2
    assert run.remaining() == pytest.approx(expected)


def _seal(store: ArtifactStore, stage: str, key: str, params: dict, seconds: float) -> None:
    tmp = store.begin(stage, key)
    (tmp / "out.txt").write_text(key)
    store.seal(stage, key, tmp, params=params, upstream={}, metrics={}, mlflow_run_id=None,
               extra={"seconds": seconds})


def test_previous_seconds_come_from_the_newest_folder_with_the_same_params(tmp_path):
    store = ArtifactStore(tmp_path)
    assert previous_seconds(store, "curate", {"curate": {"max_side": 512}}) is None
    _seal(store, "curate", "a" * 24, {"curate": {"max_side": 512}}, 30.0)
    _seal(store, "curate", "b" * 24, {"curate": {"max_side": 256}}, 5.0)
    assert previous_seconds(store, "curate", {"curate": {"max_side": 512}}) == 30.0
    assert previous_seconds(store, "curate", {"curate": {"max_side": 256}}) == 5.0
    assert previous_seconds(store, "curate", {"curate": {"max_side": 128}}) is None
    time.sleep(0.01)
    _seal(store, "curate", "c" * 24, {"curate": {"max_side": 512}}, 42.0)  # a newer run, other code
    assert previous_seconds(store, "curate", {"curate": {"max_side": 512}}) == 42.0


def test_plain_reporter_lines_and_heartbeat():
    clock = FakeClock()
    lines: list[str] = []
    reporter = PlainReporter(lines.append, now=clock, heartbeat_s=0.02)
    reporter.planned([PlannedStage("acquire", cached=True), PlannedStage("train", False, 120.0)])
    reporter.started("acquire")
    reporter.finished("acquire", "cached")
    reporter.started("train")
    clock.t += 30
    deadline = time.monotonic() + 5
    while not any("30 s in this stage" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.01)
    reporter.finished("train", "ran")
    reporter.close()
    assert lines[0] == "mammo run: 2 stages, 1 reused from earlier runs, 1 to run; about 2 min left"
    assert lines[1] == "[1/2] acquire - reused from an earlier run (same code, params and inputs)"
    assert lines[3].startswith(f"[2/2] train - {PURPOSE['train']} | run 0 s, about 2 min left")
    beat = next(line for line in lines if "30 s in this stage" in line)
    assert beat == "[2/2] train - still running, 30 s in this stage | run 30 s, about 2 min left"  # 90 s
    assert lines[-1] == "[2/2] train - done in 30 s | run 30 s, almost done"


def test_rich_reporter_keeps_one_line_per_finished_stage_and_shows_the_estimate():
    clock = FakeClock()
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    reporter = RichReporter(console, now=clock)
    reporter.planned([PlannedStage("acquire", cached=True), PlannedStage("train", False, 120.0)])
    reporter.started("acquire")
    reporter.finished("acquire", "cached")
    reporter.started("train")
    clock.t += 30
    live = reporter.status_text()  # the live display's last column now
    reporter.finished("train", "ran")
    reporter.close()
    assert live == "stage 30 s · run 30 s · about 2 min left"
    text = out.getvalue()
    assert "mammo run: 2 stages, 1 reused from earlier runs, 1 to run; about 2 min left" in text
    assert "[1/2] acquire reused in 0 s" in text and "[2/2] train done in 30 s" in text


@pytest.mark.slow
def test_the_logged_first_run_says_stage_purpose_time_and_where_results_are(smoke_store: Path):
    """The session's smoke run went to a pipe (not a terminal): its output must be the plain progress log."""
    out = (smoke_store / "first_run.txt").read_text()
    assert re.search(rf"mammo run: {len(STAGES)} stages, 0 reused from earlier runs, {len(STAGES)} to run", out)
    for i, stage in enumerate(STAGES, start=1):
        start = re.search(rf"^\[{i}/{len(STAGES)}\] {stage} - (.+) \| run .+, (.+)$", out, re.M)
        assert start and start.group(1) == PURPOSE[stage], stage
        done = re.search(rf"^\[{i}/{len(STAGES)}\] {stage} - done in (\d+ s|\d+ min \d\d s) \| run .+, "
                         rf"(about .+ left|almost done)$", out, re.M)
        assert done, f"no 'done' line for {stage}"
    report = re.search(r"^Report \(open in a browser\): (.+report\.html)$", out, re.M)
    assert report and Path(report.group(1)).is_file()
    assert Path(report.group(1)).is_relative_to(smoke_store.resolve() / "stages" / "report")
    ui = f"mammo ui --store {smoke_store.resolve()}"
    assert re.search(rf"^Runs, metrics and artifacts in the MLflow UI: {re.escape(ui)}$", out, re.M)
