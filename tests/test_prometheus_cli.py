"""``mqtasks worker --metrics-port``: one process serves its own metrics; a supervisor
serves the sum over its children (``--processes``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests._helpers.brokers import cleanup, unique_name
from tests.control_app import NAP, make_app

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _succeeded(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return -1.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mqtasks_task_succeeded_total" and sample.labels.get("task") == NAP:
                return float(sample.value)
    return 0.0


@pytest.fixture
def names(redis_url: str) -> Iterator[tuple[str, str]]:
    app_name, queue = unique_name("prom-app"), unique_name("prom")
    yield app_name, queue
    app = make_app(redis_url, app_name, queue)
    cleanup(app)
    app.close()


@pytest.mark.parametrize("processes", ["1", "2"])
def test_worker_serves_prometheus_metrics(
    redis_url: str, names: tuple[str, str], processes: str
) -> None:
    app_name, queue = names
    port = _free_port()
    env = {
        **os.environ,
        "MQTASKS_BROKER_URL": redis_url,
        "CONTROL_TEST_APP": app_name,
        "CONTROL_TEST_QUEUE": queue,
        "PYTHONPATH": str(ROOT),
    }
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mqtasks",
            "worker",
            "-A",
            "tests.control_app",
            "-c",
            "2",
            "--processes",
            processes,
            "--metrics-port",
            str(port),
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    app = make_app(redis_url, app_name, queue)
    try:
        deadline = time.monotonic() + 30
        while _succeeded(port) < 0:  # the port is served once the worker started
            assert time.monotonic() < deadline, "metrics never served"
            time.sleep(0.2)
        nap = app.get_task(NAP)
        for _ in range(6):
            nap.delay(0.0)
        while _succeeded(port) < 6:
            assert time.monotonic() < deadline + 30, f"counted {_succeeded(port)} of 6"
            time.sleep(0.3)
        assert _succeeded(port) == 6
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
        app.close()
    assert worker.returncode == 0, err.decode(errors="replace")[-2000:]
