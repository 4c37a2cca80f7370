"""acquire with cbis-tcia: a download with failed series is never sealed; the next run retries them."""

from __future__ import annotations

from pathlib import Path

import pytest

from mammo_core.config import load_params
from mammo_core.sources.tcia import IncompleteDownload, is_finished
from tasks.stages import acquire
from tests.helpers.fake_tcia import Failure, FakeNbiaServer, FakeSeries
from tests.helpers.paths import SMOKE

ROOT_UID = "1.3.6.1.4.1.9590.100.1.2"


def test_failed_series_fail_acquire_by_name_and_are_retried_next_run(tmp_path: Path) -> None:
    series = [FakeSeries.make(f"{ROOT_UID}.{i}00", f"{ROOT_UID}.{i}0", f"Mass-Training_P_0000{i}_LEFT_CC")
              for i in (1, 2, 3)]
    broken = series[1].series_uid
    out = tmp_path / "CBIS-DDSM"
    # fails on the first run's 2 attempts, then the server is fine again
    with FakeNbiaServer(series, {broken: Failure("error_500", times=2)}) as server:
        data = load_params(SMOKE, ["data.source=cbis-tcia", f"data.root={out}",
                                   f"data.base_url={server.base_url}"]).data
        with pytest.raises(IncompleteDownload) as failure:
            acquire.download(data, out, retries=1, backoff=0, timeout=10, allow_http_loopback=True)
        message = str(failure.value)
        assert f"1 of 3 series failed to download into {out}: {broken} (" in message
        assert "HTTP 500" in message and "only the failed ones are retried" in message
        assert not is_finished(out, broken)
        assert [is_finished(out, s.series_uid) for s in series] == [True, False, True]

        summary = acquire.download(data, out, retries=1, backoff=0, timeout=10, allow_http_loopback=True)
        assert summary.downloaded == [broken]
        assert sorted(summary.skipped) == sorted(s.series_uid for s in series if s.series_uid != broken)
        assert [server.image_requests(s.series_uid) for s in series] == [1, 3, 1]
    assert all(is_finished(out, s.series_uid) for s in series)
