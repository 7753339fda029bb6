"""What S13 and S14 share: one publish or one worker process in isolation, the
harness's own log events captured meanwhile, and passwords kept out of results."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import structlog

from mqtasks import App
from mqtasks.config import TLSOptions
from mqtasks.exceptions import MQTasksError

from ..workers import ROOT

__all__ = [
    "WORKER_PROBE_TIMEOUT",
    "Probe",
    "captured",
    "finish_cli",
    "json_lines",
    "probe_publish",
    "scrub",
    "scrubbed_errors",
    "start_cli",
    "worker_cli_argv",
    "worker_probe",
]

#: Seconds a worker process that cannot (or must not) connect may take to exit.
WORKER_PROBE_TIMEOUT = 60.0


@dataclasses.dataclass
class Probe:
    """What one attempt to publish, or to start a worker, came to."""

    #: ``connected`` or ``refused``.
    outcome: str
    #: The error text (str of the exception, or the worker's output), empty if none.
    text: str = ""
    #: Every text a user could see: the exception with its chained causes, or stdout + stderr.
    shown: str = ""
    #: Worker: its exit code (None: it kept running until the timeout).
    code: int | None = None
    #: Log events the harness process emitted meanwhile (captured, never printed).
    logs: list[MutableMapping[str, Any]] = dataclasses.field(default_factory=list)

    def summary(self, limit: int = 300) -> dict[str, Any]:
        """JSON-able figures (error text shortened)."""
        out: dict[str, Any] = {"outcome": self.outcome}
        if self.code is not None or self.outcome == "connected":
            out["exit_code"] = self.code
        if self.text:
            out["error"] = self.text[:limit]
        return out


_capture_lock = threading.Lock()
_captures: list[list[MutableMapping[str, Any]]] = []


def _capture(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: hand events to every open :func:`captured`, then drop them."""
    with _capture_lock:
        if not _captures:
            return event_dict
        for logs in _captures:
            logs.append({**event_dict, "log_level": method_name})
    raise structlog.DropEvent


@contextlib.contextmanager
def captured() -> Iterator[list[MutableMapping[str, Any]]]:
    """Collect the harness process's structlog events meanwhile (from every thread:
    the publisher's too), instead of printing them among the JSON results.

    Thread-safe, unlike ``structlog.testing.capture_logs``: the harness runs two
    lanes of scenarios side by side, so a capture may also see the other lane's
    events; callers filter on what they look for.
    """
    logs: list[MutableMapping[str, Any]] = []
    with _capture_lock:
        processors = list(structlog.get_config()["processors"])
        if _capture not in processors:
            structlog.configure(processors=[_capture, *processors])
        _captures.append(logs)
    try:
        yield logs
    finally:
        with _capture_lock:
            for i, open_logs in enumerate(_captures):
                if open_logs is logs:
                    del _captures[i]
                    break


def probe_publish(
    url: str, queue: str, *, tls: TLSOptions | None = None, retries: int = 0
) -> Probe:
    """Publish one no-op task to ``queue`` at ``url`` from this process."""
    overrides: dict[str, Any] = {"tls": tls} if tls is not None else {}
    with captured() as logs:
        app = App(
            "reliability-probe",
            broker=url,
            default_queue=queue,
            publish_retries=retries,
            connect_timeout=5.0,
            publish_timeout=10.0,
            **overrides,
        )
        task = app.task(name="rel.probe", max_retries=0)(_noop)
        try:
            task.delay()
        except MQTasksError as exc:
            shown = "".join(traceback.format_exception(exc)) + repr(exc)
            probe = Probe("refused", str(exc), shown)
        else:
            probe = Probe("connected")
        finally:
            app.close()
    probe.logs = list(logs)
    return probe


def _noop() -> None:
    """The probes' task: never run."""


def worker_cli_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "mqtasks", "worker", "-A", "reliability.tasks", "-c", "1", *extra]


def start_cli(argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv,
        env=dict(env),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish_cli(proc: subprocess.Popen[str], timeout: float) -> tuple[int | None, str, str]:
    """Wait for ``proc``; SIGTERM then SIGKILL it past ``timeout``. Return (code or None, out, err)."""
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return None, out, err


def worker_probe(proc: subprocess.Popen[str]) -> Probe:
    """A worker that must not connect: ``refused`` if it exits with ``worker.start_failed``."""
    code, out, err = finish_cli(proc, WORKER_PROBE_TIMEOUT)
    shown = out + err
    failed = [line for line in shown.splitlines() if "worker.start_failed" in line]
    if code is not None and code != 0 and failed:
        return Probe("refused", _error_field(failed[0]), shown, code)
    return Probe("connected" if code is None else f"exited {code}", shown[-300:], shown, code)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among the lines of ``text`` (a worker's log)."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                data = json.loads(line)
                if isinstance(data, dict):
                    out.append(data)
    return out


def _error_field(line: str) -> str:
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return line
    return str(data.get("error") or line)


def scrub(result: dict[str, Any], passwords: Mapping[str, str]) -> dict[str, Any]:
    """Make sure no password is in the result; one found fails the run (count and label only)."""
    text = json.dumps(result, default=str)
    found = {label: text.count(p) for label, p in passwords.items() if p and p in text}
    if not found:
        return result
    for p in passwords.values():
        if p:
            text = text.replace(p, "<password>")
    clean: dict[str, Any] = json.loads(text)
    clean.setdefault("checks", []).append(
        {"check": "result_without_passwords", "ok": False, "value": found, "want": "0"}
    )
    clean["passed"] = False
    return clean


@contextlib.contextmanager
def scrubbed_errors(passwords: Mapping[str, str]) -> Iterator[None]:
    """Re-raise an unexpected error without its chain, passwords replaced: the
    harness puts the error and its traceback into the result."""
    try:
        yield
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        for p in passwords.values():
            if p:
                text = text.replace(p, "<password>")
        raise RuntimeError(text) from None
