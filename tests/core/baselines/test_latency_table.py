"""Table 6's time column: every (model, batch size) call timed interleaved in one process."""

from __future__ import annotations

import time

import pytest
from torch import nn

from mammo_core.baselines import latency


def test_rows_give_per_image_times_at_each_batch_size_from_one_interleaved_loop():
    order = []

    def sleeper(name: str, seconds: float):
        def call():
            order.append(name)
            time.sleep(seconds)
        return call

    calls = {("slow", 1): sleeper("slow@1", 0.02), ("slow", 4): sleeper("slow@4", 0.04),
             ("fast", 1): sleeper("fast@1", 0.002)}
    rows = {(r["model"], r["batch_size"]): r for r in latency.batch_latency_rows(calls, repeats=3)}
    assert rows[("slow", 1)]["ms_per_batch"] == pytest.approx(20, abs=15)
    assert rows[("slow", 4)]["ms_per_image"] == pytest.approx(rows[("slow", 4)]["ms_per_batch"] / 4)
    assert rows[("slow", 4)]["ms_per_image"] < rows[("slow", 1)]["ms_per_image"]
    assert rows[("fast", 1)]["ms_per_batch"] < rows[("slow", 1)]["ms_per_batch"]
    # one warm-up each, then the three models take turns in every repeat
    assert order == ["slow@1", "slow@4", "fast@1"] * 4
    with pytest.raises(ValueError, match="repeats"):
        latency.interleaved_ms(calls, repeats=0)


def test_a_module_call_runs_the_model_on_a_batch_of_patch_sized_images():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    out = latency.module_call(net, batch=5, patch_size=8)()
    assert tuple(out.shape) == (5, 2) and not net.training
