"""Results: the middleware that stores each task's outcome in the app's result backend.

A worker of an app with a backend runs it just before
:class:`~mqtasks.middleware.retries.Retries`, so its ``after_process`` runs
once the retry or dead letter is decided, and before the message is
acknowledged: a result is stored before the broker forgets the message. If
the backend cannot take a final outcome, the message is deferred (published
again, held by the broker for a short while) instead of being acknowledged
with its result missing.

Worker threads whose tasks end while another thread is writing results hand
theirs to the next write: one thread writes everything waiting in one call
(:meth:`~mqtasks.backend.base.Backend.store_results`, one round trip on Redis),
and each thread acknowledges its own message once its own result is written.

The record format is :mod:`mqtasks.result`'s.
"""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from ..backend.base import ResultWrite
from ..exceptions import BackendError, EncodeError, SkipMessage
from ..result import (
    FAILED,
    RETRYING,
    STARTED,
    SUCCEEDED,
    Outcome,
    dead_letter_state,
    decode_outcome,
    make_outcome,
)
from .base import DeferBackoff, Middleware, ensure

if TYPE_CHECKING:
    from ..backend.base import Backend
    from ..message import Message
    from ..worker import Worker

__all__ = ["Results", "current_outcome", "with_results"]

logger = structlog.get_logger("mqtasks.results")


@dataclass(slots=True)
class _Processing:
    """What Results learns about the message being processed, hook by hook."""

    #: The dead-letter reason, once ``after_dead_letter`` has run.
    reason: str | None = None


_processing: contextvars.ContextVar[_Processing | None] = contextvars.ContextVar(
    "mqtasks_results_processing", default=None
)
_outcome: contextvars.ContextVar[Outcome | None] = contextvars.ContextVar(
    "mqtasks_results_outcome", default=None
)


class _Pending:
    """One thread's result, waiting in a :class:`GroupCommit` queue."""

    __slots__ = ("error", "item", "lead", "ready", "written")

    def __init__(self, item: ResultWrite) -> None:
        self.item = item
        #: Held until the result is written (or the thread is to write the next batch).
        self.ready = threading.Lock()
        self.ready.acquire()
        self.lead = False
        self.written = False
        self.error: BaseException | None = None


class GroupCommit:
    """Writes the results of threads that finish together in one backend call.

    A thread with a result to store queues it. If no write is under way, it
    writes everything queued (its own result among it) in one
    :meth:`~mqtasks.backend.base.Backend.store_results` call; otherwise it
    waits. The writer then wakes the threads whose results it wrote, and, if
    more results were queued meanwhile, the first of their threads, which
    writes those. No thread of its own: a result stored alone is written by
    the thread that made it, with no hand-off, and no thread's result waits
    for more than the write under way and its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._writing = False

    def store(self, backend: Backend, item: ResultWrite) -> bool:
        """Store ``item`` (with whatever else is queued); return whether it was written.

        Raises:
            BackendError: The write that held ``item`` failed.
        """
        pending = _Pending(item)
        with self._lock:
            self._queue.append(pending)
            lead = not self._writing
            self._writing = True
        if not lead:
            pending.ready.acquire()  # released once written, or to write the next batch
        if lead or pending.lead:
            self._write(backend)
        if pending.error is not None:
            error = pending.error
            if isinstance(error, BackendError):
                raise BackendError(str(error)) from error  # each thread its own exception
            raise error
        return pending.written

    def _write(self, backend: Backend) -> None:
        """Write the queue in one call; wake its threads, and the next writer if any."""
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            written = backend.store_results([p.item for p in batch])
            for p, done in zip(batch, written, strict=True):
                p.written = done
        except BaseException as exc:
            for p in batch:
                p.error = exc
        finally:
            with self._lock:
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._writing = False
                else:
                    successor.lead = True
            for p in batch:
                p.ready.release()
            if successor is not None:
                successor.ready.release()


def current_outcome() -> Outcome | None:
    """Return the final outcome of the message being processed, once Results has stored it.

    For middleware whose ``after_process`` runs after Results' (installed
    before it in the stack), such as the workflow middleware. It is the
    outcome the backend holds: when the message ran before and its first
    outcome is stored already, that first one. With ``ignore_result`` it is
    the outcome that was not stored (not encoded either). None when there is no final outcome (the
    task is retried, the message requeued or deferred) or outside a message.
    """
    return _outcome.get()


class Results(Middleware):
    """Stores what became of each task in the app's result backend.

    ``SUCCEEDED`` with the value when the task returns; ``DEAD_LETTERED``
    with the reason and the exception once its message is in the dead-letter
    queue (retries exhausted, :exc:`~mqtasks.exceptions.Reject`, bad input
    whose id is known); ``RETRYING`` when the next attempt is scheduled;
    ``STARTED`` before it runs, for tasks with ``track_started=True``;
    ``REVOKED`` for a dead letter whose reason is ``revoked``. A value
    JSON cannot carry, or larger than ``max_message_size``, is stored as
    ``FAILED`` with an :exc:`~mqtasks.exceptions.EncodeError` (the task is not
    retried: its value would never fit). Tasks with ``ignore_result=True``
    store nothing.

    The first final outcome stored for a task id wins: a message delivered
    twice (after a worker crash) keeps the result of its first run.

    Workers install it (between the app's middleware and
    :class:`~mqtasks.middleware.retries.Retries`) when the app has a backend;
    put an instance in ``app.middleware`` to choose its arguments.

    Args:
        defer_delay: Seconds a message whose result could not be stored is
            held before it runs again; doubled for each failure in a row (with
            jitter), up to ``max_defer_delay``.
        max_defer_delay: The longest such hold, in seconds.
    """

    task_options = frozenset({"ignore_result", "track_started"})

    def __init__(self, *, defer_delay: float = 1.0, max_defer_delay: float = 30.0) -> None:
        self._backoff = DeferBackoff(defer_delay, max_defer_delay)
        self.defer_delay = defer_delay
        self.max_defer_delay = max_defer_delay
        self._commit = GroupCommit()

    def __repr__(self) -> str:
        return f"Results(defer_delay={self.defer_delay}, max_defer_delay={self.max_defer_delay})"

    # -- hooks ---------------------------------------------------------------------

    def before_process(self, worker: Worker, message: Message) -> None:
        """Start following the message; store ``STARTED`` for tasks with ``track_started``."""
        _processing.set(_Processing())
        _outcome.set(None)
        if _option(worker, message, "track_started") and not _option(
            worker, message, "ignore_result"
        ):
            self._store_progress(worker, message, STARTED)

    def after_retry(
        self, worker: Worker, message: Message, delay: float, exception: BaseException
    ) -> None:
        """Store ``RETRYING`` with the exception that made the attempt fail."""
        if not _option(worker, message, "ignore_result"):
            self._store_progress(worker, message, RETRYING, exception)

    def after_dead_letter(self, worker: Worker, message: Message | None, reason: str) -> None:
        """Note the reason (stored by ``after_process``); for bad input, store ``DEAD_LETTERED``."""
        processing = _processing.get()
        if processing is not None and message is not None:
            processing.reason = reason
            return
        # Refused before it ran (unknown task, undecodable, expired...): no
        # after_process follows, so the outcome is stored here, if an id is known.
        task_id = message.id if message is not None else worker.current_task_id
        if not task_id or (message is not None and _option(worker, message, "ignore_result")):
            return
        app = worker.app
        state = dead_letter_state(reason)
        outcome = make_outcome(
            state, task=message.task if message is not None else None, reason=reason
        )
        record = outcome.encode(app.settings.max_message_size)
        try:
            self._commit.store(
                app.backend, ResultWrite(task_id, record, True, app.settings.result_expires)
            )
        except BackendError as exc:
            # The message is in the dead-letter queue: a replay stores it again.
            logger.error(
                "result.store_failed",
                task_id=task_id,
                state=state,
                error=str(exc),
                note="the message is in the dead-letter queue; replaying it stores a result",
            )

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Store the final outcome (value or dead letter), before the message is acknowledged."""
        processing = _processing.get()
        if isinstance(exception, SkipMessage) or processing is None:
            return
        if exception is None:
            state, reason = SUCCEEDED, None
        elif processing.reason is not None:
            state, reason = dead_letter_state(processing.reason), processing.reason
        else:
            return  # retried, requeued or deferred: not over yet
        app = worker.app
        outcome = make_outcome(
            state, task=message.task, value=result, exception=exception, reason=reason
        )
        if _option(worker, message, "ignore_result"):
            _outcome.set(outcome)
            return
        limit = app.settings.max_message_size
        try:
            record = outcome.encode(limit)
        except EncodeError as error:
            logger.error(
                "result.unencodable",
                task_id=message.id,
                task_name=message.task,
                error=str(error),
                note="stored as FAILED with EncodeError; not retried",
            )
            outcome = make_outcome(FAILED, task=message.task, exception=error)
            record = outcome.encode(limit)
        try:
            written = self._commit.store(
                app.backend, ResultWrite(message.id, record, True, app.settings.result_expires)
            )
            if not written:  # it ran before: the first outcome stands
                stored = app.backend.get_result(message.id)
                if stored is not None and stored[1]:
                    outcome = decode_outcome(stored[0])
        except BackendError as exc:
            delay = self._backoff.next_delay()
            logger.error(
                "result.store_failed",
                task_id=message.id,
                task_name=message.task,
                state=state,
                error=str(exc),
                delay=round(delay, 3),
                note="deferred: the task runs again once the delay is over",
            )
            worker.defer(message, delay, "result_store_failed")
            return
        self._backoff.reset()
        _outcome.set(outcome)

    # -- helpers -----------------------------------------------------------------------

    def _store_progress(
        self,
        worker: Worker,
        message: Message,
        state: str,
        exception: BaseException | None = None,
    ) -> None:
        """Store a non-final outcome; a backend error is logged and the task goes on."""
        app = worker.app
        record = make_outcome(state, task=message.task, exception=exception).encode(
            app.settings.max_message_size
        )
        try:
            self._commit.store(
                app.backend, ResultWrite(message.id, record, False, app.settings.result_expires)
            )
        except BackendError as exc:
            logger.warning(
                "result.store_failed",
                task_id=message.id,
                task_name=message.task,
                state=state,
                error=str(exc),
            )


def _option(worker: Worker, message: Message, name: str) -> bool:
    """The task's ``name`` option (False for an unregistered task)."""
    task = worker.app.tasks.get(message.task)
    return bool(task.options.get(name, False)) if task is not None else False


def with_results(middleware: list[Middleware]) -> list[Middleware]:
    """Return ``middleware`` with :class:`Results` at the end, unless it has one already."""
    return ensure(middleware, Results)
