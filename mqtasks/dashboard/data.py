"""What the dashboard's pages show, read from the app: workers, tasks, schedules, circuits, dead letters.

Each reader returns plain values (dicts, lists, strings) ready for a template
or a JSON response, and says what is missing when the app lacks a part (a
result backend, heartbeats) instead of failing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .._url import redact
from ..dlq import DeadLetter
from ..exceptions import MQTasksError
from ..middleware.circuits import circuit_status
from ..result import decode_outcome, fetch_outcome
from ..scheduler import Scheduler

if TYPE_CHECKING:
    from ..app import App
    from ..control import WorkerView

__all__ = [
    "NO_BACKEND",
    "circuits",
    "dead_letter_row",
    "rate",
    "schedules",
    "seconds",
    "task_detail",
    "task_outcomes",
    "when",
    "worker_rows",
]

#: Said where a page needs the result backend the app does not have.
NO_BACKEND = (
    "This needs a result backend: App(..., backend='redis://...') or MQTASKS_BACKEND_URL; "
    "workers then store each task's outcome there."
)


def when(at: float | datetime | None) -> str:
    """Format an epoch time or a datetime as ``YYYY-MM-DD HH:MM:SS`` UTC ("-" for None)."""
    if at is None:
        return "-"
    if not isinstance(at, datetime):
        at = datetime.fromtimestamp(at, tz=timezone.utc)
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: float | None) -> str:
    """Format a duration: ``4.2 s``, ``3m05s``, ``2h07m`` ("-" for None)."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f} s"
    minutes, secs = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def rate(value: float | None, signed: bool = False) -> str:
    """Format a rate per second with two decimals ("-" for None)."""
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def worker_rows(views: list[WorkerView], now: float | None = None) -> list[dict[str, Any]]:
    """Turn heartbeat monitor views (``WorkerView``) into table rows, live workers first."""
    now = time.time() if now is None else now
    rows = []
    for view in views:
        hb = view.heartbeat
        rows.append(
            {
                "worker_id": hb.worker_id,
                "host": hb.host,
                "pid": hb.pid,
                "queues": list(hb.queues),
                "concurrency": hb.concurrency,
                "busy": hb.busy,
                "done": hb.done,
                "failed": hb.failed,
                "rss_mb": round(hb.rss / 2**20, 1),
                "version": hb.version,
                "last_seen": round(max(0.0, now - view.last_seen), 1),
                "lost": bool(view.lost),
                "active": [
                    {
                        "id": str(a.get("id") or a.get("task_id") or ""),
                        "task": str(a.get("task") or a.get("name") or ""),
                        "started_at": when(a.get("started_at")),
                    }
                    for a in hb.active
                ],
            }
        )
    rows.sort(key=lambda r: (r["lost"], r["host"], r["pid"]))
    return rows


def task_outcomes(app: App, items: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
    """Return the stored outcome of each ``(task id, task name)``, in order (PENDING if none).

    Raises:
        BackendError: The backend cannot be read.
    """
    if not items:
        return []
    stored = app.backend.get_results([task_id for task_id, _ in items])
    rows = []
    for (task_id, name), record in zip(items, stored, strict=True):
        outcome = decode_outcome(record[0]) if record is not None else None
        rows.append(
            {
                "id": task_id,
                "task": (outcome.task if outcome else None) or name or "-",
                "state": outcome.state if outcome else "PENDING",
                "at": when(outcome.at) if outcome else "-",
                "reason": outcome.reason if outcome else None,
            }
        )
    return rows


def task_detail(app: App, task_id: str) -> dict[str, Any] | None:
    """Return a task's stored outcome for the detail page, or None if nothing is stored.

    Raises:
        BackendError: The backend cannot be read.
    """
    outcome = fetch_outcome(app.backend, task_id)
    if outcome is None:
        return None
    value = None
    if outcome.succeeded:
        value = json.dumps(outcome.value, indent=2, ensure_ascii=False, default=str)
    return {
        "id": task_id,
        "task": outcome.task,
        "state": outcome.state,
        "final": outcome.final,
        "at": when(outcome.at),
        "reason": outcome.reason,
        "error_type": outcome.error_type,
        "error_message": outcome.error_message,
        "traceback": outcome.traceback,
        "failed_task_id": outcome.failed_task_id,
        "value": value,
    }


def schedules(app: App) -> tuple[list[dict[str, Any]], str | None]:
    """Return the app's periodic schedules, and a note when the backend's part is missing.

    With a result backend, each row has the last tick sent and the leader, as
    ``mqtasks beat --list`` shows them.
    """
    if not list(app.schedules):
        return [], None
    now = time.time()
    if not app.has_backend:
        rows = [
            {
                "name": s.name,
                "task": s.task,
                "schedule": s.describe(),
                "next_run": when(s.next_tick(now)),
                "last_sent": "-",
                "leader": "-",
            }
            for s in app.schedules
        ]
        return rows, "The scheduler needs a result backend; " + NO_BACKEND
    try:
        listing = Scheduler(app).listing()
    except MQTasksError as exc:
        return [], redact(f"The schedules could not be read: {exc}")
    return [
        {
            **dataclasses.asdict(s),
            "next_run": when(s.next_run),
            "last_sent": when(s.last_sent),
            "leader": s.leader or "none (no mqtasks beat leads)",
        }
        for s in listing
    ], None


def circuits(app: App) -> tuple[list[dict[str, Any]], str | None]:
    """Return the state of each circuit breaker, and a note when it cannot be read."""
    if not app.circuits:
        return [], None
    if not app.has_backend:
        return [], "Circuit breakers keep their state in the result backend. " + NO_BACKEND
    try:
        return circuit_status(app), None
    except MQTasksError as exc:
        return [], redact(f"The circuits could not be read: {exc}")


def dead_letter_row(entry: DeadLetter) -> dict[str, Any]:
    """Return a dead-letter entry as a row (the body and headers left out)."""
    return {
        "id": entry.id,
        "task": entry.task or "-",
        "reason": entry.reason or "-",
        "exception": entry.exception or "",
        "attempts": entry.attempts if entry.attempts is not None else "-",
        "failed_at": when(entry.failed_at),
        "queue": entry.queue,
    }
