"""The small CLI commands (phantom, download, stage selection) in-process through typer's runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from flows.cli import app, select_stages
from mammo_core.data.cbis_tables import find_case_csvs, load_case_tables
from tasks.registry import ORDER
from tests.helpers.fake_tcia import Failure, FakeNbiaServer, FakeSeries

ROOT_UID = "1.3.6.1.4.1.9590.100.1.2.77"
runner = CliRunner()


def test_phantom_command_writes_a_parseable_twin(tmp_path):
    out = tmp_path / "twin"
    result = runner.invoke(app, ["phantom", str(out), "--patients", "3", "--seed", "4",
                                 "--height", "256", "--width", "160"])
    assert result.exit_code == 0, result.output
    table = load_case_tables(find_case_csvs(out))
    assert table.rejected.empty
    assert table.rows["patient_id"].nunique() == 3
    assert any((out / "CBIS-DDSM").rglob("1-1.dcm"))


def test_download_command_reports_failures_and_exit_code(tmp_path):
    series = [
        FakeSeries.make(f"{ROOT_UID}.1", f"{ROOT_UID}.10", "Mass-Training_P_00001_LEFT_CC"),
        FakeSeries.make(f"{ROOT_UID}.2", f"{ROOT_UID}.20", "Mass-Training_P_00002_LEFT_CC"),
    ]
    with FakeNbiaServer(series, failures={f"{ROOT_UID}.2": Failure("bad_md5", times=99)}) as server:
        result = runner.invoke(app, ["download", str(tmp_path), "--base-url", server.base_url,
                                     "--allow-http-loopback", "--workers", "2"])
    assert result.exit_code == 1  # one series failed: the command says so with its exit code
    assert (tmp_path / "CBIS-DDSM" / "Mass-Training_P_00001_LEFT_CC" / f"{ROOT_UID}.10" / f"{ROOT_UID}.1").is_dir()
    assert not (tmp_path / "CBIS-DDSM" / "Mass-Training_P_00002_LEFT_CC").exists()


def test_download_limit(tmp_path):
    series = [FakeSeries.make(f"{ROOT_UID}.{i}", f"{ROOT_UID}.9{i}", f"Mass-Training_P_0000{i}_LEFT_CC")
              for i in range(1, 4)]
    with FakeNbiaServer(series) as server:
        result = runner.invoke(app, ["download", str(tmp_path), "--base-url", server.base_url,
                                     "--allow-http-loopback", "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "CBIS-DDSM").iterdir())) == 2


def test_download_refuses_plain_http_without_the_loopback_flag(tmp_path):
    series = [FakeSeries.make(f"{ROOT_UID}.1", f"{ROOT_UID}.91", "Mass-Training_P_00001_LEFT_CC")]
    with FakeNbiaServer(series) as server:
        result = runner.invoke(app, ["download", str(tmp_path / "out"), "--base-url", server.base_url])
        assert server.requests == {}  # refused before any request
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # rich wraps the error panel
    assert "TCIA downloads need https (plain http only to a loopback test server" in text
    assert not (tmp_path / "out").exists()


def test_stage_selection():
    names = [spec.name for spec in ORDER]
    assert names[:2] == ["acquire", "curate"]
    assert select_stages(None, None, None) == names
    assert select_stages("curate", None, None) == names[1:]
    assert select_stages(None, "acquire", None) == ["acquire"]
    assert select_stages(None, None, ["curate"]) == ["curate"]
    with pytest.raises(typer.BadParameter, match="unknown stage 'curat'"):
        select_stages("curat", None, None)


def test_invalid_params_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  n_patient: 3\n")
    result = runner.invoke(app, ["run", "-p", str(bad), "--store", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "data.n_patient: unknown key" in result.output
    assert not (Path(tmp_path) / "s" / "stages").exists()
