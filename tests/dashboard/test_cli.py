"""``mqtasks dashboard``: the safe-bind rule, --auth and its environment variable, the server."""

from __future__ import annotations

import socket
import subprocess

import httpx
import pytest

from mqtasks.cli.dashboard import is_loopback
from tests._helpers.cli import MQTASKS, ROOT, clean_env, run
from tests._helpers.wait import wait_for

APP = "tests.dashboard.cli_app"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_other_bind_without_auth_or_read_only_is_a_usage_error(host: str) -> None:
    result = run([MQTASKS, "dashboard", "-A", APP, "--host", host])
    assert result.returncode == 2
    assert "--auth" in result.stderr and "--read-only" in result.stderr


@pytest.mark.parametrize("auth", ["nocolon", ":pw", "user:"])
def test_bad_auth_is_a_usage_error(auth: str) -> None:
    result = run([MQTASKS, "dashboard", "-A", APP, "--auth", auth])
    assert result.returncode == 2
    assert "USER:PASSWORD" in result.stderr


def test_bad_auth_in_the_environment_is_a_usage_error() -> None:
    result = run([MQTASKS, "dashboard", "-A", APP], env=clean_env(MQTASKS_DASHBOARD_AUTH="nocolon"))
    assert result.returncode == 2
    assert "MQTASKS_DASHBOARD_AUTH" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serves_with_auth_from_the_environment() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [MQTASKS, "dashboard", "-A", APP, "--port", str(port)],
        cwd=ROOT,
        env=clean_env(MQTASKS_DASHBOARD_AUTH="ops:pa:ss"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/queues"

    def up() -> httpx.Response | None:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            return httpx.get(url)
        except httpx.TransportError:
            return None

    try:
        assert wait_for(up, "the dashboard to listen").status_code == 401
        page = httpx.get(url, auth=("ops", "pa:ss"))
        assert page.status_code == 200
        assert "dashboard-cli" in page.text
        # Bound to loopback, it answers loopback names only (no DNS rebinding).
        rebound = httpx.get(url, auth=("ops", "pa:ss"), headers={"Host": f"evil.example:{port}"})
        assert rebound.status_code == 400
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    assert proc.returncode == 0
