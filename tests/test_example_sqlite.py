"""The SQLite quickstart (``examples/sqlite_quickstart``) runs a real worker process on a file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests._helpers.cli import ROOT


def test_sqlite_quickstart_runs_a_worker_process_on_a_file(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    env = {**os.environ, "MQTASKS_BROKER_URL": f"sqlite:///{db}"}
    result = subprocess.run(
        [sys.executable, "-m", "examples.sqlite_quickstart.run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for photo in (1, 2, 3, 4):  # 4 was held by the file for a second
        assert f"worker: thumbnail of photo {photo} made" in out
    assert out.count("worker: charging order 7 failed") == 2  # the first attempt and its retry
    assert "dead letter: examples.sqlite_quickstart.app.charge_card max_retries_exceeded" in out
    assert "worker exited with 0" in out
    assert db.exists()


def test_sqlite_quickstart_defaults_to_a_file_in_the_current_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MQTASKS_BROKER_URL"}
    env["PYTHONPATH"] = str(ROOT)
    code = (
        "from examples.sqlite_quickstart.app import app; "
        "print(app.transport.path)"  # the transport is built, no file is opened yet
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "sqlite_quickstart.db")
