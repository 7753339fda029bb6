"""Long dashboard actions (replaying or purging dead letters) run as jobs the browser follows.

An action starts a job in a thread and redirects to the job's page, which polls
the job's JSON for its progress until it is done.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from .._url import redact

__all__ = ["Job", "Jobs", "Work"]

logger = structlog.get_logger("mqtasks.dashboard")

#: The work of a job: given a progress callback (one call per item done), return the count.
Work = Callable[[Callable[[], None]], int]


@dataclass
class Job:
    """One action's progress."""

    #: The job's id (in its URL).
    id: str
    #: What it does, for people: ``Replay 3 dead letters of emails``.
    title: str
    #: Where to go when it is done.
    back: str
    #: Items expected, if known.
    total: int | None
    #: Items done so far.
    done: int = 0
    #: ``running``, ``done`` or ``failed``.
    state: str = "running"
    #: The error (masked) if it failed.
    error: str | None = None
    #: The count the work returned.
    result: int | None = None
    started_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """Return the job as JSON-able values."""
        return dataclasses.asdict(self)


class Jobs:
    """The dashboard's jobs, the last ``keep`` of them."""

    def __init__(self, keep: int = 50) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()

    def start(self, title: str, back: str, total: int | None, work: Work) -> Job:
        """Run ``work`` in a thread as a new job; return the job at once."""
        job = Job(id=secrets.token_urlsafe(9), title=title, back=back, total=total)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep:
                self._jobs.popitem(last=False)

        def progress() -> None:
            job.done += 1

        def run() -> None:
            try:
                job.result = work(progress)
                job.done = max(job.done, job.result)
                job.state = "done"
            except Exception as exc:  # shown on the job's page; the dashboard goes on
                job.error = redact(f"{type(exc).__name__}: {exc}")
                job.state = "failed"
                logger.warning("dashboard.job_failed", job=job.title, error=job.error)

        threading.Thread(target=run, name=f"mqtasks-dashboard-job-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job | None:
        """Return the job ``job_id``, or None (unknown or forgotten)."""
        with self._lock:
            return self._jobs.get(job_id)
