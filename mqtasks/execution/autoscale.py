"""Autoscaling: a worker's thread pool follows its backlog between MIN and MAX threads.

``mqtasks worker --autoscale MIN,MAX`` runs an :class:`Autoscaler` beside the
worker. Every ``interval`` seconds it reads the load: the tasks running
(``Worker.running``), the messages waiting (ready in the broker, read with
``Transport.message_counts`` over the transport's own connections, never the
consumer's, while every thread is busy and before a shrink; and those received
and waiting for a thread), and asks the ``ScalePolicy`` (``mqtasks._scaling``)
for a size, which ``Worker.resize`` applies (the prefetch window follows).
Every change is logged as ``worker.autoscaled`` with its reason.

With ``--processes``, the supervisor scales the number of children instead:
each child runs a :class:`LoadReporter`, which writes the same readings to a
file the supervisor reads (``mqtasks/_supervise.py``), as the supervisor
imports only the standard library and cannot read the broker itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import structlog

from .._scaling import IDLE, ScalePolicy
from ..exceptions import MQTasksError
from ..ordering.queues import partitions_of

if TYPE_CHECKING:
    from ..worker import Worker

__all__ = ["Autoscaler", "LoadReporter", "WorkerLoad"]

logger = structlog.get_logger("mqtasks.execution.autoscale")


class WorkerLoad:
    """Reads a worker's load: busy slots, and messages waiting in the broker (its queues,
    and the partition queues of the ordered tasks on them) and in it.

    Args:
        worker: The worker (started or not).
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        app = worker.app
        # Ordered tasks wait in the partition queues of their queue, not in it
        # (none for a queue the broker orders itself: an SQS FIFO queue).
        partitions = partitions_of(app, worker.queues)
        self._specs = [app.queue(q) for q in [*worker.queues, *partitions]]
        self._failing = False

    def sample(self, *, count: bool = True) -> tuple[int, int | None, int]:
        """Return ``(busy, ready, held)``: threads running a task, messages ready in the
        broker (None: it cannot tell now) and those received waiting for a thread.

        Args:
            count: Ask the broker; False: only while every thread is busy (``ready``
                is 0 otherwise), for a caller that asks again before it shrinks.
        """
        busy = self.worker.running
        ready = self.ready() if count or busy >= self.worker.concurrency else 0
        return busy, ready, self.held()

    def ready(self) -> int | None:
        """Messages ready in the broker over the worker's queues; None if it cannot tell now."""
        try:
            counts = self.worker.app.transport.message_counts(self._specs)
        except MQTasksError as exc:
            # Logged once per outage: the worker's own reconnects say the rest.
            if not self._failing:
                logger.warning("autoscale.backlog_unknown", error=str(exc))
            self._failing = True
            return None
        self._failing = False
        return sum(counts.values())

    def held(self) -> int:
        """Deliveries the worker received that wait for a thread.

        Read from the worker's work queue rather than from its counters of
        deliveries received and settled: those also count deliveries dropped
        after a reconnect and ordered tasks held for a retry, which no thread
        could take.
        """
        return self.worker._work.qsize()


class _Periodic:
    """A daemon thread that calls :meth:`tick` every ``interval`` seconds until stopped."""

    name = "mqtasks-periodic"

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError("the autoscale interval must be positive.")
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it (a few seconds at most: a broker query that
        hangs in an outage does not hold up the worker's stop)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _main(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # a bad reading must not end autoscaling for good
                logger.exception("autoscale.tick_failed")

    def tick(self) -> None:
        """Do one round's work."""
        raise NotImplementedError


class Autoscaler(_Periodic):
    """Resizes ``worker``'s thread pool between ``minimum`` and ``maximum`` threads.

    It grows while every thread is busy and messages wait, straight to what
    the backlog asks for (capped at ``maximum``); it shrinks by one thread
    after each ``idle`` seconds in which a thread stayed unused and nothing
    waited (never below ``minimum``). See ``ScalePolicy`` (``mqtasks._scaling``).

    Args:
        worker: The worker to resize; :meth:`start` once the worker has started.
        minimum: The fewest threads (at least 1).
        maximum: The most threads (at least ``minimum``).
        idle: Seconds of spare threads before one goes.
        interval: Seconds between two readings of the load (with a broker query
            while every thread is busy, and before a shrink).

    Raises:
        ValueError: The bounds, the idle period or the interval are impossible.
    """

    name = "mqtasks-autoscale"

    def __init__(
        self,
        worker: Worker,
        minimum: int,
        maximum: int,
        *,
        idle: float = 30.0,
        interval: float = 2.0,
    ) -> None:
        super().__init__(interval)
        self.worker = worker
        self.policy = ScalePolicy(minimum, maximum, idle=idle)
        self.load = WorkerLoad(worker)

    def start(self) -> None:
        """Bring the worker within the bounds at once, then start reading its load."""
        first = self.policy.decide(self.worker.concurrency, 0, 0, time.monotonic())
        if first is not None:
            self._resize(*first, busy=0, waiting=0, quiet=0.0)
        super().start()

    def tick(self) -> None:
        """Read the load once and resize the worker if the policy says so."""
        # The broker is asked while every thread is busy (it may then grow), and
        # before a shrink: with a thread free, a consumer that pushes or blocks for
        # messages has taken what was ready, so an idle worker queries nothing (on
        # RabbitMQ each count opens a connection); one that polls may lag behind.
        busy, ready, held = self.load.sample(count=False)
        if ready is None:
            return  # the broker cannot tell now: no decision on half a picture
        now = time.monotonic()
        waiting = ready + held
        quiet_since = self.policy.quiet_since
        decision = self.policy.decide(self.worker.concurrency, busy, waiting, now)
        if decision is not None and decision[1] == IDLE:
            counted = self.load.ready()
            if counted is None:
                return
            if counted:  # messages wait after all: not idle (the idle period restarts)
                waiting += counted
                decision = self.policy.decide(self.worker.concurrency, busy, waiting, now)
        if decision is not None:
            quiet = 0.0
            if decision[1] == IDLE and quiet_since is not None:
                quiet = now - quiet_since
            self._resize(*decision, busy=busy, waiting=waiting, quiet=quiet)

    def _resize(self, size: int, reason: str, *, busy: int, waiting: int, quiet: float) -> None:
        if self._stop.is_set():
            return  # stopped while it read the broker: the worker may be stopping too
        previous = self.worker.concurrency
        self.worker.resize(size)
        logger.info(
            "worker.autoscaled",
            concurrency=size,
            previous=previous,
            reason=reason,
            busy=busy,
            waiting=waiting,
            idle_s=round(quiet, 1),
            minimum=self.policy.minimum,
            maximum=self.policy.maximum,
        )


class LoadReporter(_Periodic):
    """Writes ``worker``'s load to ``path`` every ``interval`` seconds, for the supervisor.

    The file holds one JSON object, replaced whole each time (written aside,
    then renamed): ``pid``, ``concurrency``, ``busy``, ``ready`` (in the
    broker; null when it cannot tell), ``held`` (received, waiting for a
    thread) and ``at`` (epoch seconds). :meth:`stop` removes it.

    The broker is asked while every thread is busy, and otherwise every
    ``count_every`` reports (``ready`` is 0 in between): with a thread free, a
    consumer that pushes or blocks for messages (``amqp://``, ``redis://``) has
    taken what was ready, and the regular count catches one that polls; an
    idle child then opens a connection (on RabbitMQ) a fifth as often.

    Args:
        worker: The worker whose load is reported.
        path: The file; its directory must exist.
        interval: Seconds between two reports.
        count_every: Reports between two broker counts while a thread is free.
    """

    name = "mqtasks-load-report"

    def __init__(
        self, worker: Worker, path: str, *, interval: float = 2.0, count_every: int = 5
    ) -> None:
        super().__init__(interval)
        self.worker = worker
        self.path = path
        self.count_every = max(1, count_every)
        self.load = WorkerLoad(worker)
        self._reports = 0

    def tick(self) -> None:
        """Write one report."""
        count = self._reports % self.count_every == 0
        self._reports += 1
        busy, ready, held = self.load.sample(count=count)
        report: dict[str, Any] = {
            "pid": os.getpid(),
            "concurrency": self.worker.concurrency,
            "busy": busy,
            "ready": ready,
            "held": held,
            "at": time.time(),
        }
        aside = f"{self.path}.{os.getpid()}.tmp"
        with open(aside, "w", encoding="utf-8") as f:
            json.dump(report, f)
        os.replace(aside, self.path)

    def stop(self) -> None:
        """Stop reporting and remove the file (a stopping child takes no more work)."""
        super().stop()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
