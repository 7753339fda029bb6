"""The examples the docs include are tested code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests._helpers.cli import ROOT


def test_quickstart_runs_on_the_embedded_broker() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MQTASKS_BROKER_URL"}
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "done: add(2, 10) = 12" in result.stdout
    assert "done: welcome e-mail sent to user 42" in result.stdout
    assert "a task failed, as expected: flaky(1) failed on purpose" in result.stdout


def test_shop_example_tasks_run_on_memory(monkeypatch) -> None:
    monkeypatch.delenv("MQTASKS_BROKER_URL", raising=False)
    from examples.shop import app as shop
    from mqtasks.testing import drain, reset, running_worker

    try:
        assert shop.add(2, 3) == 5
        shop.send_welcome.delay(7, language="fr")
        with running_worker(shop.app) as worker:
            drain(worker)
    finally:
        reset(shop.app)


@pytest.mark.parametrize("snippet", ["test_with_fixtures.py", "test_with_fake_redis.py"])
def test_docs_fixture_snippet_passes(snippet: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"docs/_snippets/{snippet}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
