"""flows.prefect_server starts Prefect's temporary server early only when the flow would start one.

The start itself is exercised by every ``mammo run`` of the suite (tests/test_pipeline_e2e.py and the
session's smoke store); here, the cases where it must not start anything.
"""

from __future__ import annotations

from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

from flows import prefect_server


def test_no_background_start_when_an_api_url_is_set():
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert prefect_server.start_in_background() is None


def test_no_background_start_when_temporary_servers_are_not_allowed():
    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_ENABLED: False}, restore_defaults={PREFECT_API_URL}):
        assert prefect_server.start_in_background() is None

