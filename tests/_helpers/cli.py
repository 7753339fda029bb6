"""Running ``mqtasks`` as a user would: subprocesses of the command line and its workers.

A worker runs in a session of its own (``start_new_session``) so that
:meth:`CliWorker.kill` can reach every process it started, and logs JSON lines
to a file the test reads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .wait import WAIT, wait_for

__all__ = [
    "MQTASKS",
    "PYTHON",
    "ROOT",
    "CliWorker",
    "children",
    "clean_env",
    "json_lines",
    "proc_stat",
    "run",
    "session_members",
]

#: The repository root: subprocesses run there, so ``-A tests.cli_app`` imports.
ROOT = Path(__file__).resolve().parents[2]
#: The interpreter running the tests.
PYTHON = sys.executable
#: The console script installed next to the interpreter running the tests.
MQTASKS = str(Path(sys.executable).with_name("mqtasks"))


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without MQTASKS_/CLI_TEST_ variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTASKS_", "CLI_TEST_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion (killed after ``timeout`` seconds)."""
    return subprocess.run(
        args, cwd=ROOT, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )


def json_lines(text: str, event: str | None = None) -> list[dict[str, Any]]:
    """The JSON log lines in ``text`` (with ``event`` if given); other lines are skipped."""
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and (event is None or entry.get("event") == event):
            out.append(entry)
    return out


def proc_stat(pid: int) -> tuple[int, int, int] | None:
    """Return ``(ppid, pgrp, session)`` of a live, non-zombie process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[2]), int(fields[3])


def _live_processes(match: Callable[[tuple[int, int, int]], bool]) -> list[int]:
    """Live, non-zombie processes whose ``(ppid, pgrp, session)`` ``match`` accepts."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None and match(stat):
                found.append(int(entry.name))
    return found


def session_members(sid: int) -> list[int]:
    """Live processes of the session ``sid`` (a worker started with ``start_new_session``)."""
    return _live_processes(lambda stat: stat[2] == sid)


def children(pid: int) -> list[int]:
    """Live, non-zombie child processes of ``pid``."""
    return _live_processes(lambda stat: stat[0] == pid)


class CliWorker:
    """A ``mqtasks worker`` subprocess with its stderr in a file."""

    def __init__(self, proc: subprocess.Popen[bytes], stderr: Path, stdout: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr
        self.stdout_path = stdout

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def logs(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines on stderr (other lines, from stdlib logging, are skipped)."""
        return json_lines(self.stderr(), event)

    def wait_log(self, event: str, count: int = 1, timeout: float = WAIT) -> list[dict[str, Any]]:
        """Wait until ``event`` was logged ``count`` times; fail early if the worker exits."""

        def seen() -> list[dict[str, Any]] | None:
            found = self.logs(event)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with {self.proc.returncode} before logging {event!r}:\n"
                    + self.stderr()[-4000:]
                )
            return None

        found: list[dict[str, Any]] = wait_for(seen, f"{count} x {event!r} logged", timeout)
        return found

    def wait_started(self, count: int = 1) -> None:
        self.wait_log("worker.started", count)

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def wait(self, timeout: float) -> int:
        """Wait for the exit code; fail (with the log) if it takes longer than ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker still running {timeout} s later:\n{self.stderr()[-4000:]}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the worker and every process of its session; reap the worker."""
        for pid in [self.proc.pid, *session_members(self.proc.pid)]:
            if pid == self.proc.pid and self.proc.poll() is not None:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
