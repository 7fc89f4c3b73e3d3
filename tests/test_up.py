"""`loraflow up`'s server settings, without starting it: secure by default. The real server refusing a foreign
page's requests is tests/test_live_retraining.py::test_no_other_web_page_can_drive_the_api_of_loraflow_up (slow)."""

from __future__ import annotations

import pytest

from loraflow.ops.up import check_host, environment


def test_the_api_takes_csrf_tokens_and_only_the_uis_own_origin(monkeypatch):
    for name in ("PREFECT_SERVER_CSRF_PROTECTION_ENABLED", "PREFECT_SERVER_CORS_ALLOWED_ORIGINS",
                 "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"):
        monkeypatch.delenv(name, raising=False)
    env = environment("127.0.0.1", 4321)
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
    assert env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"  # Prefect's default: off
    assert env["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4321,http://localhost:4321"  # default: *
    assert "PREFECT_API_AUTH_STRING" not in env
    # a login set for the server is what our own clients log in with
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "ana:secret")
    assert environment("127.0.0.1", 4321)["PREFECT_API_AUTH_STRING"] == "ana:secret"


def test_serving_beyond_loopback_without_a_login_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="set PREFECT_SERVER_API_AUTH_STRING=user:password"):
        check_host("0.0.0.0", {})
    check_host("0.0.0.0", {"PREFECT_SERVER_API_AUTH_STRING": "ana:secret"})
    for host in ("127.0.0.1", "localhost", "::1"):
        check_host(host, {})
