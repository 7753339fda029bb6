"""The tasks running in a worker: where their bodies run (a worker thread, or the
event loop for coroutines), their time limits, and stopping one from outside.

:func:`~mqtasks.processing.process` brackets the call of a task's function
with :meth:`Execution.execute`; everything else (middleware, retries, dead
letters, results) stays on the worker thread, the same for every kind of task.

Stopping a task (its hard time limit, or :meth:`Worker.terminate()
<mqtasks.worker.Worker.terminate>`): a coroutine is cancelled, and its worker
thread, which waits for it, returns at once and dead-letters the message. A
thread cannot be killed: an asynchronous exception is raised in it as a last
attempt, and whatever it does, the worker settles its message from the
watchdog (dead-letter, then ack), forgets whatever the thread returns later,
and starts a thread in its place. Threads that go on running (blocked in C,
or catching the exception) are counted; past ``max_abandoned_threads`` the
worker asks to be replaced (:attr:`Worker.recycle <mqtasks.worker.Worker.recycle>`).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import structlog

from ..exceptions import SoftTimeLimitExceeded, TaskTerminated, TimeLimitExceeded
from ..processing import REJECT, conclude
from .loop import EventLoopThread, Outcome
from .timelimit import CHECK, HARD, SOFT, Watchdog, clear_async_exception, raise_in_thread

if TYPE_CHECKING:
    from ..message import Message
    from ..processing import Job
    from ..task import Task
    from ..worker import Worker

__all__ = ["EventLoopBlocked", "Execution", "Running"]

logger = structlog.get_logger("mqtasks.worker")

#: Seconds after a thread is given up before it counts as still running (the
#: asynchronous exception stops a Python loop well within that).
_ABANDON_GRACE = 1.0


class EventLoopBlocked(RuntimeError):
    """A coroutine task waited on an event loop that another task blocked past its
    hard time limit; the worker gave that loop up. Retried as any failure."""

    def __init__(self, blocker: str) -> None:
        super().__init__(
            f"the event loop was blocked by {blocker} past its hard time limit and given up"
        )


class Running:
    """A task running in this worker, from just before its function is called to its end."""

    __slots__ = (
        "abandoned",
        "atask",
        "context",
        "finished",
        "hard_at",
        "hit",
        "job",
        "loop",
        "message",
        "outcome",
        "soft_sent",
        "started_at",
        "thread",
        "thread_id",
    )

    def __init__(self, job: Job, message: Message, is_async: bool) -> None:
        self.job = job
        self.message = message
        #: When it started (epoch seconds).
        self.started_at = time.time()
        self.thread = threading.current_thread()
        self.thread_id = threading.get_ident()
        #: The context the task started in (its middleware's state), for settling it elsewhere.
        self.context = contextvars.copy_context()
        #: A coroutine's outcome, which the worker thread waits for (None: a thread's task).
        self.outcome: Outcome | None = Outcome() if is_async else None
        self.atask: asyncio.Task[Any] | None = None
        self.loop: EventLoopThread | None = None
        self.soft_sent = False
        #: When its hard limit is due (monotonic), once its soft one is in the heap.
        self.hard_at: float | None = None
        #: Why the worker stopped it (hard limit, terminate), once it has.
        self.hit: TaskTerminated | None = None
        self.finished = False
        #: Its thread was given up: its message is settled, what it returns is ignored.
        self.abandoned = False

    @property
    def atask_name(self) -> str:
        """The name of its asyncio task: ``<task name>[<task id>]``."""
        return f"{self.message.task}[{self.message.id}]"


def _supervised() -> bool:
    """Whether this process is a child of ``mqtasks worker --processes``."""
    return bool(os.environ.get("MQTASKS_SUPERVISOR_PID"))


class Execution:
    """The running tasks of one worker, its watchdog and its event loop."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._lock = worker._lock
        self._running: dict[str, Running] = {}
        self._watchdog: Watchdog | None = None
        self._loop: EventLoopThread | None = None
        #: Task functions that returned, and those that raised, since the worker started.
        self.done = self.failed = 0
        #: Coroutines stopped by the worker that caught their cancellation and run on.
        self._strays: list[asyncio.Task[Any]] = []
        # A supervised child is replaced at once, and cheaply (its supervisor forks
        # or starts a fresh one, with no crash-loop pause): a thread it cannot stop
        # is one too many there. A lone worker process tolerates a few, as its
        # replacement is up to an outside process manager.
        settings = worker.app.settings
        #: Threads past their hard limit that may go on running before ``Worker.recycle`` is set.
        self.max_abandoned = 0 if _supervised() else settings.max_abandoned_threads
        self._block_threshold = settings.loop_block_threshold

    # -- the worker thread's side ------------------------------------------------------

    def execute(
        self, job: Job, message: Message, task: Task[Any, Any]
    ) -> tuple[Any, BaseException | None, bool]:
        """Run ``task``'s function on ``message``'s arguments here (a coroutine: on the loop).

        Returns:
            ``(result, error, abandoned)``: abandoned when the worker gave the task
            up while it ran; its message is settled already, and this thread must
            take no more work.
        """
        entry = Running(job, message, task.is_async)
        self._running[message.id] = entry
        soft, hard = task.soft_time_limit, task.time_limit
        if soft is not None or hard is not None:
            # One deadline in the heap per task: the hard one is pushed when the soft one fires.
            watchdog = self._watchdog or self._start_watchdog()
            now = time.monotonic()
            if soft is not None:
                entry.hard_at = None if hard is None else now + hard
                watchdog.schedule(now + soft, SOFT, entry)
            elif hard is not None:
                watchdog.schedule(now + hard, HARD, entry)
        result: Any = None
        error: BaseException | None = None
        try:
            try:
                result = task.fn(*message.args, **message.kwargs)
                if entry.outcome is not None or inspect.isawaitable(result):
                    result = self._await(entry, result, entry.atask_name)
            except BaseException as exc:
                error = exc
            abandoned = self._end(entry)
        except (SoftTimeLimitExceeded, TaskTerminated) as late:  # raised as the task ended
            if error is None and result is None:
                error = late
            abandoned = self._end(entry)
        with self._lock:
            if error is None:
                self.done += 1
            else:
                self.failed += 1
        return result, error, abandoned

    def active(self) -> list[dict[str, Any]]:
        """The running tasks: ``{"id", "task", "started_at"}`` each, oldest first."""
        with self._lock:
            entries = list(self._running.values())
        return sorted(
            (
                {"id": e.message.id, "task": e.message.task, "started_at": e.started_at}
                for e in entries
            ),
            key=lambda a: a["started_at"],
        )

    def _end(self, entry: Running) -> bool:
        """Mark ``entry`` ended, so no exception is raised in its thread any more."""
        while True:
            try:
                with self._lock:
                    entry.finished = True
                    if self._running.get(entry.message.id) is entry:
                        del self._running[entry.message.id]
                    if entry.outcome is None and (entry.soft_sent or entry.hit is not None):
                        clear_async_exception(entry.thread_id)  # one that has not arrived yet
                    return entry.abandoned
            except (SoftTimeLimitExceeded, TaskTerminated):
                continue

    def _await(self, entry: Running, awaitable: Any, name: str) -> Any:
        """Run ``awaitable`` on the event loop; wait for and return its outcome."""
        if entry.outcome is None:  # a plain function that returned a coroutine
            with self._lock:
                entry.outcome = Outcome()
        outcome = entry.outcome
        coro = awaitable if inspect.iscoroutine(awaitable) else _wrap(awaitable)
        loop = entry.loop = self.loop()

        # No lock: each side writes its flag, then reads the other's; under the
        # GIL one of them sees both, and cancels (see _soft and _stop).
        def started(atask: asyncio.Task[Any]) -> bool:
            entry.atask = atask
            return not (entry.soft_sent or entry.hit is not None)

        def done(atask: asyncio.Task[Any]) -> None:
            if atask.cancelled():
                if entry.hit is None and not entry.soft_sent and loop.closing:
                    # The worker stopped before it ended: like a thread still running
                    # then, its message is left unacknowledged, for the broker to redeliver.
                    return
                soft = SoftTimeLimitExceeded() if entry.soft_sent else asyncio.CancelledError()
                outcome.set(None, entry.hit or soft)
            elif (exc := atask.exception()) is not None:
                outcome.set(None, exc)
            else:
                outcome.set(atask.result())

        loop.submit(coro, name=name, context=entry.context, done=done, started=started)
        return outcome.wait()

    def loop(self) -> EventLoopThread:
        """The worker's event loop, started on first use."""
        loop = self._loop
        if loop is None:
            with self._lock:
                if self._loop is None:
                    self._loop = EventLoopThread(self._block_threshold)
                loop = self._loop
        return loop

    # -- stopping tasks ----------------------------------------------------------------

    def terminate(self, task_id: str, reason: str) -> bool:
        """Stop the task running as ``task_id`` and dead-letter it with ``reason``."""
        entry = self._running.get(task_id)
        if entry is None:
            return False
        return self._stop(
            entry, TaskTerminated(f"terminated by the worker: {reason}", reason=reason)
        )

    def _start_watchdog(self) -> Watchdog:
        with self._lock:
            if self._watchdog is None:
                self._watchdog = Watchdog(self._fire, lambda entry: not entry.finished)
            return self._watchdog

    def _fire(self, kind: str, entry: Any) -> None:
        if kind == SOFT:
            self._soft(entry)
            if entry.hard_at is not None and self._watchdog is not None:
                self._watchdog.schedule(entry.hard_at, HARD, entry)
        elif kind == HARD:
            task = self.worker.app.tasks.get(entry.message.task)
            limit = f" ({task.time_limit:g} s)" if task is not None and task.time_limit else ""
            self._stop(entry, TimeLimitExceeded(f"ran past its hard time limit{limit}"))
        elif kind == CHECK:
            self._check_abandoned(entry)

    def _soft(self, entry: Running) -> None:
        with self._lock:
            if entry.finished or entry.hit is not None:
                return
            entry.soft_sent = True
            atask = entry.atask
            if entry.outcome is None:
                raise_in_thread(entry.thread_id, SoftTimeLimitExceeded)
            elif atask is not None and entry.loop is not None:
                entry.loop.call(atask.cancel)
        logger.warning("task.soft_time_limit", **_fields(entry))

    def _stop(self, entry: Running, error: TaskTerminated) -> bool:
        """Stop ``entry``'s task (see the module docstring); False if it had ended."""
        worker = self.worker
        with self._lock:
            if entry.finished or entry.hit is not None:
                return False
            entry.hit = error
            outcome = entry.outcome
            atask = entry.atask
            if outcome is None:
                entry.abandoned = True
                raise_in_thread(entry.thread_id, type(error))
                worker._running -= 1
                if self._running.get(entry.message.id) is entry:
                    del self._running[entry.message.id]
                worker._pool.abandon(entry.thread)
            elif atask is not None and entry.loop is not None:
                entry.loop.call(atask.cancel)
        logger.warning(
            "task.stopped",
            **_fields(entry),
            reason=error.reason,
            mode="thread" if outcome is None else "coroutine",
        )
        if outcome is not None:
            # Its worker thread returns now and dead-letters the message itself.
            outcome.set(None, error)
        elif not worker._done.is_set():  # (the I/O thread, gone, would never ack it)
            delivery = entry.job.delivery
            try:
                # The worker thread's own ending, run here in a copy of its context.
                action = entry.context.run(conclude, worker, delivery, entry.message, None, error)
            except Exception:  # pragma: no cover - conclude() handles hook errors
                logger.exception("worker.process_crashed", message_id=delivery.message_id)
                action = REJECT
            worker._post((delivery, action))
        watchdog = self._watchdog or self._start_watchdog()
        grace = max(_ABANDON_GRACE, 2 * self._block_threshold)  # a blocked loop is seen by then
        watchdog.schedule(time.monotonic() + grace, CHECK, entry)
        return True

    def _check_abandoned(self, entry: Running) -> None:
        """Count the given-up threads still running; past the bound, ask to be replaced."""
        worker = self.worker
        loop, atask = entry.loop, entry.atask
        if loop is not None and loop.blocked:
            # A coroutine past its hard limit that does not let the loop run: the
            # loop is given up like a thread, and a new one runs the next coroutines.
            # Those waiting on the old one fail (and are retried): it may never run again.
            with self._lock:
                given_up = self._loop is loop
                if given_up:
                    self._loop = None
                    worker._pool.abandoned.append(loop.thread)
                stuck = [e for e in self._running.values() if e.loop is loop]
            if given_up:
                loop.abandon()
                for other in stuck:
                    if other.outcome is not None:
                        other.outcome.set(None, EventLoopBlocked(entry.atask_name))
        elif atask is not None and not atask.done():
            # It caught its cancellation and runs on: it counts as a thread that does.
            logger.warning("task.still_running", **_fields(entry), note="ignored its cancellation")
            self._strays.append(atask)
        self._strays = [t for t in self._strays if not t.done()]
        alive = worker._pool.abandoned_alive() + len(self._strays)
        if alive > self.max_abandoned and not worker.recycle.is_set():
            worker.recycle_reason = (
                f"{alive} thread(s) past their hard time limit still run "
                f"(max_abandoned_threads={self.max_abandoned})"
            )
            logger.warning("worker.recycle", reason=worker.recycle_reason, abandoned=alive)
            worker.recycle.set()

    def stop(self) -> None:
        """Stop the watchdog and the event loop (the worker has stopped)."""
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._loop is not None and not self._loop.blocked:
            self._loop.stop()


async def _wrap(awaitable: Any) -> Any:
    """A coroutine awaiting ``awaitable`` (an object with ``__await__``)."""
    return await awaitable


def _fields(entry: Running) -> dict[str, Any]:
    message = entry.message
    return {"task_id": message.id, "task_name": message.task, "attempt": message.attempt}
