"""The harness's publishers: ``apply_async`` from a thread, every call recorded in
the ledger as ``intent`` then ``confirmed`` or ``failed``.

:class:`Publisher` keeps a steady rate and catches up after a slow call;
:class:`PacedPublisher` never catches up and keeps what each call raised (S11
judges ``delay()`` by it).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mqtasks import App
from mqtasks.exceptions import MQTasksError

from .ledger import LedgerWriter, percentile
from .workload import Job

if TYPE_CHECKING:
    from .run import Run

__all__ = ["Call", "PacedPublisher", "PublishStats", "Publisher"]


@dataclass
class PublishStats:
    """What the publisher saw."""

    calls: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    #: (t, latency) of calls slower than one second.
    slow: list[tuple[float, float]] = field(default_factory=list)
    #: Distinct texts of the errors raised (with their causes); kept out of the
    #: summary, searched for the broker's password.
    texts: set[str] = field(default_factory=set)

    def summary(self) -> dict[str, Any]:
        """JSON-able figures."""
        return {
            "calls": self.calls,
            "latency_ms_p50": _ms(percentile(self.latencies, 50)),
            "latency_ms_p99": _ms(percentile(self.latencies, 99)),
            "latency_ms_max": _ms(max(self.latencies, default=None)),
            "errors": dict(self.errors),
        }


def _error_text(exc: BaseException) -> str:
    """``exc`` and its causes as a caller could print them (message, repr, args)."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 10:
        parts += [str(seen), repr(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class Publisher:
    """Publishes jobs at a steady rate from a thread, recording intent, confirmed or failed.

    The task id is made before the first attempt (it is the first argument of
    every harness task) and written to the ledger as ``intent`` first.

    Args:
        app: The app to publish with.
        ledger: The publisher's ledger.
        rate: Calls per second (``None``: as fast as the broker confirms).
    """

    def __init__(self, app: App, ledger: LedgerWriter, rate: float | None) -> None:
        self.app = app
        self.ledger = ledger
        self.rate = rate
        self.stats = PublishStats()
        self.stop_event = threading.Event()
        self.published = 0
        self._thread: threading.Thread | None = None

    def start(self, jobs: Sequence[Job]) -> None:
        """Publish ``jobs`` in the background."""
        self._thread = threading.Thread(target=self._run, args=(jobs,), daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait until every job was published (or the publisher was stopped)."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether it is still publishing."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self, jobs: Sequence[Job]) -> None:
        t0 = time.monotonic()
        for i, job in enumerate(jobs):
            if self.stop_event.is_set():
                return
            if self.rate:
                wait = t0 + i / self.rate - time.monotonic()
                if wait > 0 and self.stop_event.wait(wait):
                    return
            self.publish(job)

    def publish(self, job: Job) -> bool:
        """Publish one job now; return whether the broker confirmed it."""
        task_id = job.args[0]
        task = self.app.tasks[job.task]
        self.ledger.record("intent", task_id)
        start = time.monotonic()
        try:
            task.apply_async(job.args, task_id=task_id, **job.options)
        except MQTasksError as exc:
            took = time.monotonic() - start
            self.ledger.record("failed", task_id, error=type(exc).__name__, took=round(took, 3))
            self.stats.errors[type(exc).__name__] += 1
            if len(self.stats.texts) < 1000:
                self.stats.texts.add(_error_text(exc))
            ok = False
        else:
            took = time.monotonic() - start
            self.ledger.record("confirmed", task_id)
            ok = True
        self.stats.calls += 1
        self.stats.latencies.append(took)
        if took > 1.0:
            self.stats.slow.append((time.time(), took))
        self.published += 1
        return ok


@dataclass(frozen=True)
class Call:
    """One ``delay()`` call as the publisher saw it."""

    id: str
    #: When it started (epoch seconds).
    t: float
    #: Seconds until it returned or raised.
    took: float
    #: The exception's type name, or None if the broker confirmed.
    error: str | None = None
    #: The start of the exception's message.
    detail: str | None = None

    @property
    def end(self) -> float:
        """When it returned or raised (epoch seconds)."""
        return self.t + self.took


class PacedPublisher:
    """Calls ``delay()`` of ``rel.work`` from a thread at most ``rate`` times a
    second for ``seconds``, recording every call in the ledger and in :attr:`calls`.

    Unlike :class:`~reliability.publisher.Publisher` it never catches up after a
    slow call (a blocked broker would otherwise be followed by a burst), and it
    keeps each exception's message: the scenarios check what ``delay()`` raised.

    Args:
        run: The run (its app, ledger directory and seed).
        phase: Names the ledger file; task ids start with ``<scenario><phase>-``.
        rate: Most calls per second.
        seconds: How long to publish.
        ms: The ``rel.work`` duration of every task.
    """

    def __init__(self, run: Run, phase: str, rate: float, seconds: float, ms: float) -> None:
        self.run = run
        self.phase = phase
        self.rate = rate
        self.seconds = seconds
        self.ms = ms
        self.prefix = f"{run.scenario}{phase}"
        self.ledger = LedgerWriter(run.ledger_dir / f"publisher-{phase}.jsonl")
        self.rng = random.Random(run.rng.getrandbits(64))
        self.calls: list[Call] = []
        self.stop_event = threading.Event()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._thread = threading.Thread(target=self._loop, name=f"publisher-{phase}", daemon=True)

    def start(self) -> None:
        """Start publishing in the background."""
        self.started_at = time.time()
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; return whether it has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """Whether it is still publishing."""
        return self._thread.is_alive()

    def _loop(self) -> None:
        try:
            end = time.monotonic() + self.seconds
            due = time.monotonic()
            while not self.stop_event.is_set():
                now = time.monotonic()
                if now >= end:
                    break
                if due > now:
                    self.stop_event.wait(due - now)
                    continue
                self.publish_one()
                # No catching up: at most 50 ms of calls behind schedule are made up.
                due = max(due + 1 / self.rate, time.monotonic() - 0.05)
        finally:
            self.finished_at = time.time()
            self.ledger.close()

    def publish_one(self) -> Call:
        """Make one ``delay()`` call now and record it."""
        task_id = f"{self.prefix}-{self.rng.getrandbits(64):016x}"
        task = self.run.app.tasks["rel.work"]
        self.ledger.record("intent", task_id)
        t = time.time()
        start = time.monotonic()
        try:
            task.apply_async((task_id, self.ms), task_id=task_id)
        except Exception as exc:  # any type: what delay() raises is a figure here
            took = time.monotonic() - start
            detail = str(exc)[:300]
            self.ledger.record(
                "failed", task_id, error=type(exc).__name__, took=round(took, 3), detail=detail
            )
            call = Call(task_id, t, took, type(exc).__name__, detail)
        else:
            took = time.monotonic() - start
            self.ledger.record("confirmed", task_id)
            call = Call(task_id, t, took)
        self.calls.append(call)
        return call

    def summary(self) -> dict[str, Any]:
        """Calls, achieved rate, latencies and errors by type."""
        took = [c.took for c in self.calls]
        span = (self.finished_at or time.time()) - (self.started_at or time.time())
        return {
            "calls": len(self.calls),
            "confirmed": sum(1 for c in self.calls if c.error is None),
            "errors": dict(Counter(c.error for c in self.calls if c.error is not None)),
            "achieved_per_s": round(len(self.calls) / span, 1) if span > 0 else None,
            "latency_ms_p50": _ms(percentile(took, 50)),
            "latency_ms_p99": _ms(percentile(took, 99)),
            "latency_ms_max": _ms(max(took, default=None)),
        }
