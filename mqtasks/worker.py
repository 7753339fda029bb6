"""Worker: consume -> decode -> dispatch -> ack or reject.

One I/O thread owns the broker connection: it receives deliveries, settles
them (ack, reject, requeue) and keeps heartbeats going, because kombu channels
are not thread-safe. Worker threads take deliveries from a local queue, run
the task and post the outcome back to the I/O thread. The broker bounds the
deliveries held at once (prefetch), and a message is acked only after its task
has finished: at-least-once.
"""

from __future__ import annotations

import contextvars
import inspect
import os
import queue
import threading
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import structlog

from ._url import redact
from .app import App, _call_hook
from .deadletter import dead_letter_envelope
from .exceptions import (
    ConfigurationError,
    DecodeError,
    MQTasksError,
    Reject,
    Retry,
    SkipMessage,
    Unroutable,
)
from .message import Message, _current, _origin
from .middleware.base import overriding
from .retry import RetryPolicy
from .transport.base import DLQ_SUFFIX, Consumer, Delivery
from .validation import check_app

__all__ = ["Worker"]

logger = structlog.get_logger("mqtasks.worker")

_ACK, _REJECT, _REQUEUE, _DROP = "ack", "reject", "requeue", "drop"
_STOP = None


def _BROKER_DEATH_HEADER(key: str) -> bool:  # noqa: N802 - reads as a constant predicate
    return key.startswith(("x-death", "x-first-death-", "x-last-death-"))


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
        self._outstanding = 0
        self._running = 0
        self._window = 0
        self._generation = 0
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
        for mw in self.app.middleware:
            _call_hook(mw.worker_boot, self)
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
        # Only the hooks middleware override are called per message: the
        # worker's hot path pays nothing for the rest.
        mws = self.app.middleware
        self._before_process = overriding(mws, "before_process")
        self._after_process = overriding(mws[::-1], "after_process")
        self._after_retry = overriding(mws[::-1], "after_retry")
        self._after_reject = overriding(mws[::-1], "after_reject")
        self._after_dead_letter = overriding(mws[::-1], "after_dead_letter")

    def _broker_warnings(self) -> list[str]:
        try:
            return self.app.transport.check_broker()
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
            if self._stop_called:
                first = False
            else:
                self._stop_called = first = True
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
        for mw in reversed(self.app.middleware):
            _call_hook(mw.worker_shutdown, self)
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
                    self._wait_settlement(0.5)
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
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # full: the I/O thread is already due to wake
            pass

    def _clear_wake(self) -> None:
        try:
            while len(os.read(self._wake_r, 4096)) == 4096:
                pass
        except (BlockingIOError, OSError):
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
        while True:
            try:
                delivery, action = get()
            except queue.Empty:
                break
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

    def _wait_settlement(self, timeout: float) -> None:
        try:
            delivery, action = self._settlements.get(timeout=timeout)
        except queue.Empty:
            return
        self._settle(delivery, action)

    def _shutdown(self, consumer: Consumer) -> None:
        consumer.cancel()
        # Hand back what no thread has started, so other workers get it now.
        while True:
            try:
                delivery = self._work.get_nowait()
            except queue.Empty:
                break
            if delivery is not None:
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
        logger.error(
            "message.rejected",
            reason=reason,
            detail=detail,
            **_fields(delivery, message),
        )
        if self.collect_errors:
            self.errors.append((message, DecodeError(reason, detail)))
        for hook in self._after_reject:
            _call_hook(hook, self, message, reason)
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
        transport = self.app.transport
        try:
            try:
                transport.publish(delivery.queue + DLQ_SUFFIX, envelope)
            except Unroutable:
                # The dead-letter queue was deleted behind our back: declare it again.
                transport.forget_declared()
                transport.declare([self.app.queue(delivery.queue)])
                transport.publish(delivery.queue + DLQ_SUFFIX, envelope)
        except MQTasksError as error:
            logger.error(
                "message.dead_letter_failed",
                **_fields(delivery, message),
                reason=reason,
                error=str(error),
                note="requeued instead; nothing is lost",
            )
            return _REQUEUE
        logger.warning(
            "task.dead_lettered",
            **_fields(delivery, message),
            reason=reason,
        )
        for hook in self._after_dead_letter:
            _call_hook(hook, self, message, reason)
        return _ACK

    def _retry(self, delivery: Delivery, message: Message, delay: float, exc: BaseException) -> str:
        """Publish the next attempt, held by the broker for ``delay`` s, then ack this one."""
        now = time.time()
        if message.expires_at is not None and now + delay >= message.expires_at.timestamp():
            return self._dead_letter(
                delivery,
                message,
                "expired",
                f"the next attempt, due in {delay:.1f} s, would start after the task expires",
                exc,
            )
        first = message.first_failed_at or datetime.fromtimestamp(now, tz=timezone.utc)
        # Drop the broker's dead-letter history from the last trip through the
        # delay queues: RabbitMQ silently drops a message that would be dead-lettered
        # again through a queue its x-death already lists (cycle detection).
        headers = {k: v for k, v in message.headers.items() if not _BROKER_DEATH_HEADER(k)}
        retry = message.copy(attempt=message.attempt + 1, first_failed_at=first, headers=headers)
        try:  # the body does not change between attempts: send it as received
            self.app.transport.publish(message.queue, retry.to_envelope(delivery.body), delay=delay)
        except ConfigurationError as error:
            # The transport cannot hold this delay (redis+kombu://): requeueing would
            # run the task again at once, in a loop; give it up with the reason instead.
            return self._dead_letter(delivery, message, "retry_unsupported", str(error), exc)
        except MQTasksError as error:
            logger.error(
                "task.retry_failed",
                task_id=message.id,
                task_name=message.task,
                attempt=message.attempt,
                queue=message.queue,
                error=str(error),
                note="requeued instead; nothing is lost",
            )
            return _REQUEUE
        logger.info(
            "task.retried",
            task_id=message.id,
            task_name=message.task,
            attempt=message.attempt,
            queue=message.queue,
            delay=round(delay, 3),
            error=redact(f"{type(exc).__name__}: {exc}")[:500],
        )
        for hook in self._after_retry:
            _call_hook(hook, self, message, delay, exc)
        return _ACK

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
        for hook in self._before_process:
            try:
                _call_hook(hook, self, message)
            except SkipMessage as skip:
                # Close the brackets opened so far: after_process of the
                # middleware before the one that skipped, in reverse.
                mws = app.middleware
                skipper = getattr(hook, "__self__", None)
                opened = mws[: mws.index(skipper)] if skipper in mws else []
                for mw in reversed(opened):
                    _call_hook(mw.after_process, self, message, result=None, exception=skip)
                return _ACK
        result: Any = None
        error: BaseException | None = None
        # Each message runs in a context of its own (see _work_main): no reset needed.
        _current.set(message)
        unawaited = False
        try:
            result = task.fn(*message.args, **message.kwargs)
        except BaseException as exc:
            error = exc
        else:
            if result is not None and _is_async(result):
                error, result, unawaited = _discard_async(result, message.task), None, True
        try:
            if error is None:
                return _ACK
            if unawaited:
                return self._refuse_async(delivery, message, error)
            return self._after_failure(delivery, message, task.retry_policy, error)
        finally:  # after a retry or dead-letter publish: middleware see the whole outcome
            for hook in self._after_process:
                _call_hook(hook, self, message, result=result, exception=error)

    def _refuse_async(self, delivery: Delivery, message: Message, exc: BaseException) -> str:
        """Dead-letter a task whose call returned a coroutine: it never ran, and never will."""
        logger.error(
            "task.failed", **_fields(delivery, message), error=f"{type(exc).__name__}: {exc}"
        )
        if self.collect_errors:
            self.errors.append((message, exc))
        return self._dead_letter(delivery, message, "async_unsupported", str(exc), exc)

    def _after_failure(
        self, delivery: Delivery, message: Message, policy: RetryPolicy, exc: BaseException
    ) -> str:
        if isinstance(exc, Reject):
            logger.info(
                "task.rejected",
                task_id=message.id,
                task_name=message.task,
                attempt=message.attempt,
                queue=message.queue,
                reason=exc.reason,
            )
            for hook in self._after_reject:
                _call_hook(hook, self, message, "rejected")
            return self._dead_letter(delivery, message, "rejected", exc.reason, exc)
        if isinstance(exc, Retry):
            if message.attempt > policy.max_retries:
                return self._dead_letter(
                    delivery,
                    message,
                    "max_retries_exceeded",
                    f"Retry requested after {message.attempt} attempts",
                    exc,
                )
            delay = exc.countdown
            if delay is None:
                delay = float(policy.backoff(policy._state(message.attempt, exc)))
            return self._retry(delivery, message, max(0.0, delay), exc)
        logger.error(
            "task.failed",
            task_id=message.id,
            task_name=message.task,
            attempt=message.attempt,
            queue=message.queue,
            error=redact(f"{type(exc).__name__}: {exc}"),
            traceback=redact("".join(traceback.format_exception(exc)))[-8192:],
        )
        if self.collect_errors:
            self.errors.append((message, exc))
        delay = policy.next_delay(message.attempt, exc)
        if delay is not None:
            return self._retry(delivery, message, delay, exc)
        if not policy.is_retryable(exc):
            return self._dead_letter(
                delivery, message, "not_retryable", f"{type(exc).__name__} is not retried", exc
            )
        return self._dead_letter(
            delivery, message, "max_retries_exceeded", f"failed {message.attempt} times", exc
        )


def _is_async(result: Any) -> bool:
    """Whether a task call returned something only an event loop can run."""
    return inspect.isawaitable(result) or inspect.isasyncgen(result)


def _discard_async(result: Any, task: str) -> ConfigurationError:
    """Close an unawaited coroutine (no "never awaited" warning); return the error it means."""
    if inspect.iscoroutine(result) or inspect.isgenerator(result):
        result.close()
    return ConfigurationError(
        f"Task {task!r} returned {type(result).__name__!r}, which only an event loop can "
        "run: async tasks are not supported yet, and the task's body did not run. Make "
        "it a plain function that runs the coroutine to completion, for example with "
        "asyncio.run(...)."
    )


def _fields(delivery: Delivery, message: Message | None) -> dict[str, Any]:
    """The task fields of a log event about ``delivery`` (``message``: None if undecodable)."""
    return {
        "task_id": delivery.message_id,
        "task_name": message.task if message else None,
        "attempt": message.attempt if message else None,
        "queue": delivery.queue,
    }
