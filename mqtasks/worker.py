"""Worker: consume -> decode -> run -> settle (ack, reject or requeue).

One I/O thread owns the broker connection: it receives deliveries, settles
them and keeps heartbeats going, because kombu channels are not thread-safe.
Worker threads take deliveries from a local queue, run the task and post the
outcome back to the I/O thread. The broker bounds the deliveries held at once
(prefetch), and a message is acked only after its task has finished (or its
next attempt or dead letter is stored): at-least-once. What becomes of a failed
task is decided by middleware (:class:`~mqtasks.middleware.retries.Retries`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ._url import redact
from .app import App
from .deadletter import dead_letter_envelope, publish_dead_letter
from .exceptions import (
    ConfigurationError,
    DecodeError,
    MQTasksError,
    Reject,
    Retry,
    SkipMessage,
)
from .message import Message, _current, _origin
from .middleware.base import Runner
from .middleware.retries import with_retries
from .task import refuse_awaitable
from .transport.base import Consumer, Delivery
from .validation import check_app, unenforced_limits

__all__ = ["Worker"]

logger = structlog.get_logger("mqtasks.worker")

_ACK, _REJECT, _REQUEUE, _DROP = "ack", "reject", "requeue", "drop"
_STOP = None


class Worker:
    """Runs the tasks of an app from its queues, with a pool of threads.

    Args:
        app: The app whose tasks run here.
        queues: Queues to consume; every queue the app's tasks publish to by default.
        concurrency: Worker threads; the app's setting by default.
        prefetch: Most unacknowledged messages held; 2 x concurrency by default.
        shutdown_timeout: Seconds :meth:`stop` lets running tasks finish.
        collect_errors: Keep task exceptions and rejections in :attr:`errors`
            (for tests; off in production so memory stays flat).
    """

    def __init__(
        self,
        app: App,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
        prefetch: int | None = None,
        shutdown_timeout: float | None = None,
        collect_errors: bool = False,
    ) -> None:
        s = app.settings
        self.app = app
        self.queues = list(queues or app.task_queues())
        self.concurrency = concurrency or s.concurrency
        self.prefetch = prefetch or s.prefetch or 2 * self.concurrency
        self.shutdown_timeout = s.shutdown_timeout if shutdown_timeout is None else shutdown_timeout
        if self.concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1.")
        # Refuse what would misbehave (idle threads, options the broker cannot
        # honour, retries it cannot hold) before any message moves.
        check_app(
            app,
            self.queues,
            concurrency=self.concurrency,
            prefetch=self.prefetch,
            shutdown_timeout=self.shutdown_timeout,
        )
        #: Most deliveries per queue before a message is dead-lettered unrun (None: no limit).
        self.delivery_limits = {q: app.delivery_limit(q) for q in self.queues}
        self.collect_errors = collect_errors
        #: ``(message or None, exception)`` pairs, when ``collect_errors`` is on.
        self.errors: list[tuple[Message | None, BaseException]] = []
        #: Deliveries received so far.
        self.received = 0
        #: Deliveries settled so far (acked, rejected or requeued).
        self.settled = 0
        #: Whether the last stop let every running task finish.
        self.clean_exit = True
        self._work: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._settlements: queue.SimpleQueue[tuple[Delivery, str]] = queue.SimpleQueue()
        # Worker threads write a byte here after posting a settlement, to wake
        # an I/O thread sleeping in select() (transports with ``wakeable``); only
        # while it sleeps (``_io_sleeping``): awake, it flushes before it sleeps again.
        self._io_sleeping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._lock = threading.Lock()
        self._outstanding = self._running = self._window = self._generation = 0
        self._consumer: Consumer | None = None
        self._threads: list[threading.Thread] = []
        self._io_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._done = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop_called = False
        self._origin = _origin()
        self._bind_hooks()

    def __repr__(self) -> str:
        return f"<Worker {self.app.name!r} queues={self.queues} concurrency={self.concurrency}>"

    # -- lifecycle -------------------------------------------------------------

    def start(self, *, timeout: float | None = 30.0) -> None:
        """Connect, declare the queues and start consuming in background threads.

        Raises:
            ConnectionFailed: The broker cannot be reached.
            ConfigurationError: A queue configuration the broker cannot honour.
        """
        self._bind_hooks()
        self._hooks.worker_boot(self)
        for i in range(self.concurrency):
            t = threading.Thread(target=self._work_main, name=f"mqtasks-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self._io_thread = threading.Thread(target=self._io_main, name="mqtasks-io", daemon=True)
        self._io_thread.start()
        self._ready.wait(timeout)
        if self._startup_error is not None:
            self._stop_threads()
            raise self._startup_error
        for warning in self._broker_warnings():
            logger.warning("broker.unsafe_config", detail=warning)
        logger.info(
            "worker.started",
            queues=self.queues,
            concurrency=self.concurrency,
            prefetch=self.prefetch,
            broker=repr(self.app.transport),
        )

    def _bind_hooks(self) -> None:
        # The app's middleware plus Retries, the decision on failures, whatever
        # the app installs; bound again at start, as the app's list may change.
        self._hooks = Runner(with_retries(self.app.middleware))

    def _broker_warnings(self) -> list[str]:
        try:
            return self.app.transport.check_broker() + unenforced_limits(self.app, self.queues)
        except Exception as exc:  # a check must never stop a worker
            return [f"broker settings could not be checked: {type(exc).__name__}"]

    def stop(self, timeout: float | None = None) -> bool:
        """Stop gracefully: stop fetching, requeue what has not started, let
        running tasks finish for up to ``timeout`` seconds, then disconnect.

        Returns:
            True if every running task finished (its message acked); False if
            some were abandoned (the broker will deliver them again).
        """
        if self._io_thread is None:
            return True
        with self._lock:
            first, self._stop_called = not self._stop_called, True
        if not first:  # not started, or stopped already (or stopping in another thread)
            self._done.wait()
            return self.clean_exit
        self._grace = self.shutdown_timeout if timeout is None else timeout
        self._stopping.set()
        if self._consumer is not None:
            self._consumer.interrupt()  # a reconnect loop in progress gives up
        self._wake()
        self._done.wait()
        self._stop_threads()
        if self.clean_exit:  # every thread has exited: nobody writes to the pipe any more
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._hooks.worker_shutdown(self)
        logger.info("worker.stopped", clean=self.clean_exit)
        return self.clean_exit

    def _stop_threads(self) -> None:
        for _ in self._threads:
            self._work.put(_STOP)
        if self.clean_exit:
            for t in self._threads:
                t.join(timeout=1.0)
        self._threads = []

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the worker has stopped; return whether it has."""
        return self._done.wait(timeout)

    @property
    def idle(self) -> bool:
        """True when no delivery is held: none running, waiting or unsettled."""
        return self._outstanding == 0

    @property
    def running(self) -> int:
        """Tasks executing right now."""
        return self._running

    # -- the I/O thread -----------------------------------------------------------

    def _io_main(self) -> None:
        try:
            specs = [self.app.queue(q) for q in self.queues]
            self._consumer = self.app.transport.consumer(specs, prefetch=self.prefetch)
            self._consumer.start(self._on_delivery)
            self._generation = self._consumer.generation
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            self._done.set()
            return
        self._ready.set()
        consumer = self._consumer
        try:
            while not self._stopping.is_set():
                self._flush()
                if consumer.wakeable:
                    # Sleeps until a delivery, a settlement or a stop arrives. A
                    # settlement posted before the flag was raised is seen here,
                    # one posted after it writes to the pipe (see _work_main).
                    self._io_sleeping = True
                    idle = self._settlements.empty() and not self._stopping.is_set()
                    consumer.wait(0.5 if idle else 0.0, self._wake_r)
                    self._io_sleeping = False
                    self._clear_wake()
                elif self._window >= self.prefetch:
                    # Nothing can arrive until something is settled: wait for that.
                    with contextlib.suppress(queue.Empty):
                        self._settle(*self._settlements.get(timeout=0.5))
                    consumer.heartbeat_check()
                else:
                    consumer.drain(timeout=0.02 if self._window else 0.5)
                if consumer.generation != self._generation:
                    self._generation = consumer.generation
                    self._window = 0  # the broker took back the old connection's messages
            self._shutdown(consumer)
        except BaseException:  # pragma: no cover - a bug; keep the process honest
            logger.exception("worker.io_crashed")
            self.clean_exit = False
            consumer.close()
        finally:
            self._done.set()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: the I/O thread is already due to wake
            os.write(self._wake_w, b"\0")

    def _clear_wake(self) -> None:
        with contextlib.suppress(OSError):  # empty
            while len(os.read(self._wake_r, 4096)) == 4096:
                pass

    def _on_delivery(self, delivery: Delivery) -> None:
        self._outstanding += 1
        self.received += 1
        self._window += 1
        if self._stopping.is_set():
            self._settle(delivery, _REQUEUE)
            return
        self._work.put(delivery)

    def _settle(self, delivery: Delivery, action: str) -> None:
        # I/O thread only: it alone touches the connection and these counters.
        consumer = self._consumer
        assert consumer is not None
        if action == _ACK:
            consumer.ack(delivery)
        elif action == _REJECT:
            consumer.reject(delivery)
        elif action == _REQUEUE:
            consumer.requeue(delivery)
        self._count_settled(delivery, action)

    def _count_settled(self, delivery: Delivery, action: str) -> None:
        if delivery.generation == self._generation and self._window:
            self._window -= 1
        if action != _DROP:
            self.settled += 1
        self._outstanding -= 1

    def _flush(self) -> None:
        get = self._settlements.get_nowait
        acks: list[Delivery] = []
        with contextlib.suppress(queue.Empty):
            while True:
                delivery, action = get()
                if action == _ACK:
                    acks.append(delivery)
                else:
                    self._settle(delivery, action)
        if acks:
            consumer = self._consumer
            assert consumer is not None
            consumer.ack_many(acks)  # one frame for many, where the transport can
            for delivery in acks:
                self._count_settled(delivery, _ACK)

    def _shutdown(self, consumer: Consumer) -> None:
        consumer.cancel()
        # Hand back what no thread has started, so other workers get it now.
        with contextlib.suppress(queue.Empty):
            while True:
                if (delivery := self._work.get_nowait()) is not None:
                    self._settle(delivery, _REQUEUE)
        deadline = time.monotonic() + self._grace
        while time.monotonic() < deadline:
            self._flush()
            if self._outstanding == 0:
                break
            if consumer.wakeable:
                consumer.wait(0.05, self._wake_r)  # keeps heartbeats; late deliveries are requeued
                self._clear_wake()
            else:
                consumer.drain(timeout=0.05)
        self._flush()
        self.clean_exit = self._outstanding == 0
        if not self.clean_exit:
            logger.warning(
                "worker.shutdown_timeout",
                abandoned=self._running,
                grace=self._grace,
                note="unacked messages go back to the broker",
            )
        consumer.close()

    # -- worker threads -------------------------------------------------------------

    def _work_main(self) -> None:
        get, put, wake = self._work.get, self._settlements.put, self._wake

        def post(item: tuple[Delivery, str]) -> None:
            put(item)
            # Read after the put: an I/O thread that raised the flag before it
            # checks the queue either sees the item or is woken here.
            if self._io_sleeping:
                wake()

        while True:
            delivery = get()
            if delivery is None:
                return
            post((delivery, self._outcome(delivery)))
            # Not kept while this thread waits for the next one: a settled
            # message's body (and the transport's copy of it) may be large.
            del delivery

    def _outcome(self, delivery: Delivery) -> str:
        """Run ``delivery`` (worker thread); return its settlement."""
        consumer = self._consumer
        if consumer is not None and delivery.generation != consumer.generation:
            # The connection it came on is gone and the broker delivers it again.
            return _DROP
        if self._stopping.is_set():
            return _REQUEUE
        with self._lock:
            self._running += 1
        try:
            # A fresh copy of the thread's context per message: what the
            # task or a middleware binds (structlog contextvars, the
            # OpenTelemetry context) ends with the message.
            action: str = contextvars.copy_context().run(self._process, delivery)
        except BaseException:  # pragma: no cover - _process handles task errors
            logger.exception("worker.process_crashed", message_id=delivery.message_id)
            action = _REJECT
        finally:
            with self._lock:
                self._running -= 1
        return action

    def _reject(self, delivery: Delivery, message: Message | None, reason: str, detail: str) -> str:
        """Bad input: log it, dead-letter it with its reason, never run or requeue it."""
        logger.error("message.rejected", reason=reason, detail=detail, **_fields(delivery, message))
        if self.collect_errors:
            self.errors.append((message, DecodeError(reason, detail)))
        self._hooks.after_reject(self, message, reason)
        return self._dead_letter(delivery, message, reason, detail)

    def _dead_letter(
        self,
        delivery: Delivery,
        message: Message | None,
        reason: str,
        detail: str,
        exc: BaseException | None = None,
    ) -> str:
        """Publish the original message to ``<queue>.dlq`` with the reason, confirmed.

        Returns the settlement: ack once the dead-letter queue has it; requeue
        if it could not be stored (a broker problem: the message must not be lost).
        """
        envelope = dead_letter_envelope(
            delivery, message, reason=reason, detail=detail, exc=exc, worker=self._origin
        )
        try:
            publish_dead_letter(self.app.transport, self.app.queue(delivery.queue), envelope)
        except MQTasksError as error:
            logger.error(
                "message.dead_letter_failed",
                **_fields(delivery, message),
                reason=reason,
                error=str(error),
                note="requeued instead; nothing is lost",
            )
            return _REQUEUE
        logger.warning("task.dead_lettered", **_fields(delivery, message), reason=reason)
        self._hooks.after_dead_letter(self, message, reason)
        return _ACK

    # -- what the deciding middleware calls (Retries) ---------------------------------

    @property
    def decided(self) -> bool:
        """Whether the message this thread processes is retried or dead-lettered already."""
        job = _job.get()
        return job is not None and job.action is not None

    def retry(
        self, message: Message, retry: Message, delay: float, exception: BaseException
    ) -> None:
        """Publish ``retry``, the next attempt of ``message``, held ``delay`` s; then ack ``message``.

        For the deciding middleware's ``after_process`` (:class:`~mqtasks.middleware.retries.Retries`).
        The body goes as received; if the broker refuses it, ``message`` is requeued instead.

        Raises:
            ConfigurationError: The transport cannot hold a delay; nothing was published.
        """
        job = _current_job()
        try:
            envelope = retry.to_envelope(job.delivery.body)
            self.app.transport.publish(message.queue, envelope, delay=delay)
        except ConfigurationError:
            raise
        except MQTasksError as error:
            logger.error(
                "task.retry_failed",
                **_fields(job.delivery, message),
                error=str(error),
                note="requeued instead; nothing is lost",
            )
            job.action = _REQUEUE
            return
        logger.info(
            "task.retried",
            **_fields(job.delivery, message),
            delay=round(delay, 3),
            error=redact(f"{type(exception).__name__}: {exception}")[:500],
        )
        self._hooks.after_retry(self, message, delay, exception)
        job.action = _ACK

    def dead_letter(
        self, message: Message, reason: str, detail: str, exception: BaseException | None = None
    ) -> None:
        """Publish ``message`` to its dead-letter queue with ``reason``, confirmed; then ack it.

        For the deciding middleware's ``after_process``; if the dead-letter
        queue cannot be written, ``message`` is requeued instead.
        """
        job = _current_job()
        job.action = self._dead_letter(job.delivery, message, reason, detail, exception)

    # -- running one message ------------------------------------------------------------

    def _over_delivery_limit(self, delivery: Delivery) -> str | None:
        """Dead-letter a message delivered more often than its queue allows, unrun."""
        limit = self.delivery_limits.get(delivery.queue)
        count = delivery.delivery_count
        if limit is None or count is None or count <= limit:
            return None
        try:
            message = Message.from_delivery(delivery, max_size=self.app.settings.max_message_size)
        except DecodeError:
            message = None
        detail = (
            f"delivered {count} times, over the queue's limit of {limit}: its worker "
            "crashed, was killed or lost its connection each time (the task may be what "
            "kills it); not run again"
        )
        return self._reject(delivery, message, "delivery_limit", detail)

    def _process(self, delivery: Delivery) -> str:
        app = self.app
        over = self._over_delivery_limit(delivery)
        if over is not None:
            return over
        try:
            message = Message.from_delivery(delivery, max_size=app.settings.max_message_size)
        except DecodeError as exc:
            return self._reject(delivery, None, exc.reason, exc.detail)
        task = app.tasks.get(message.task)
        if task is None:
            return self._reject(
                delivery, message, "unknown_task", f"no task named {message.task!r}"
            )
        if message.is_expired():
            return self._reject(delivery, message, "expired", f"expired at {message.expires_at}")
        try:
            task.check_arguments(message.args, message.kwargs)
        except TypeError as exc:
            return self._reject(delivery, message, "invalid_arguments", str(exc))
        hooks = self._hooks
        try:
            hooks.before_process(self, message)
        except SkipMessage:
            return _ACK
        result: Any = None
        error: BaseException | None = None
        refused: ConfigurationError | None = None
        # Each message runs in a context of its own (see _work_main): no reset needed.
        _current.set(message)
        _job.set(job := _Job(delivery))
        try:
            result = task.fn(*message.args, **message.kwargs)
            if result is not None and (refused := refuse_awaitable(result, message.task)):
                error, result = refused, None
        except BaseException as exc:
            error = exc
        if error is not None:
            self._report(delivery, message, error)
        if refused is not None:  # nothing can await it: never retried
            job.action = self._dead_letter(
                delivery, message, "async_unsupported", str(refused), refused
            )
        # The deciding middleware (Retries) comes last in the stack, so it
        # retries or dead-letters before the others see the outcome.
        hooks.after_process(self, message, result, error)
        if error is None:
            return _ACK
        if job.action is None:  # the deciding hook failed (logged as middleware.hook_failed)
            logger.error("task.undecided", **_fields(delivery, message), note="requeued")
        return job.action or _REQUEUE

    def _report(self, delivery: Delivery, message: Message, exc: BaseException) -> None:
        """Log how the task ended, before the deciding middleware acts on it."""
        if isinstance(exc, Reject):
            logger.info("task.rejected", **_fields(delivery, message), reason=exc.reason)
            self._hooks.after_reject(self, message, "rejected")
        elif not isinstance(exc, Retry):
            logger.error(
                "task.failed",
                **_fields(delivery, message),
                error=redact(f"{type(exc).__name__}: {exc}"),
                traceback=redact("".join(traceback.format_exception(exc)))[-8192:],
            )
            if self.collect_errors:
                self.errors.append((message, exc))


@dataclass(slots=True)
class _Job:
    """The delivery a worker thread runs, and its settlement once decided."""

    delivery: Delivery
    action: str | None = None


#: The job of the message running in this context (one context per message).
_job: contextvars.ContextVar[_Job | None] = contextvars.ContextVar("mqtasks_job", default=None)


def _current_job() -> _Job:
    if (job := _job.get()) is None:
        raise RuntimeError("Worker.retry() and dead_letter() are for after_process hooks.")
    return job


def _fields(delivery: Delivery, message: Message | None) -> dict[str, Any]:
    """The task fields of a log event about ``delivery`` (``message``: None if undecodable)."""
    return {
        "task_id": delivery.message_id,
        "task_name": message.task if message else None,
        "attempt": message.attempt if message else None,
        "queue": delivery.queue,
    }
