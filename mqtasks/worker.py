"""Worker: consume -> decode -> run -> settle (ack, reject or requeue).

One I/O thread owns the broker connection: it receives deliveries, settles
them and keeps heartbeats going, because kombu channels are not thread-safe.
Worker threads take deliveries from a local queue, run the task and post the
outcome back to the I/O thread. The broker bounds the deliveries held at once
(prefetch), and a message is acked only after its task has finished (or its
next attempt or dead letter is stored) and, with a result backend, its outcome
is stored: at-least-once. What becomes of a failed task is decided by
middleware (:class:`~mqtasks.middleware.retries.Retries`); the outcome is
stored by :class:`~mqtasks.middleware.results.Results`.

How tasks run is ``mqtasks.execution``'s: the thread pool, the event loop
where ``async def`` tasks run (their worker thread waits for them, so
``concurrency`` bounds them too), the time limits, and stopping a running task
(:meth:`Worker.terminate`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

import structlog

from . import revoke as _revoke
from .app import App
from .broadcast import WorkerBroadcast
from .events import warn_stale_bindings
from .exceptions import ConfigurationError
from .execution import decisions as _decisions
from .execution.batch import BatchDue, Batches
from .execution.pool import ThreadPool
from .execution.running import Execution
from .message import Message, _origin
from .middleware import with_flow_control
from .middleware.base import Runner
from .middleware.idempotency import with_idempotency
from .middleware.results import with_results
from .middleware.retries import with_retries
from .middleware.workflow import with_workflow
from .ordering.runtime import OrderedDeliveries, check_consumer, ordered_deliveries
from .processing import ABANDONED as _ABANDONED
from .processing import ACK as _ACK
from .processing import BATCHED as _BATCHED
from .processing import DROP as _DROP
from .processing import HOLD as _HOLD
from .processing import REJECT as _REJECT
from .processing import REQUEUE as _REQUEUE
from .processing import current_job, dead_letter, job_or_none, process
from .transport.base import Consumer, Delivery
from .validation import broker_warnings, check_app, check_backend

__all__ = ["Worker"]

logger = structlog.get_logger("mqtasks.worker")


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
        # A prefetch given follows no resize(); the default, 2 x concurrency, does.
        self._prefetch_given = bool(prefetch or s.prefetch)
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
        #: The subscriptions whose queues it consumes (bound at :meth:`start`).
        self.subscriptions = [s for s in app.subscriptions if s.queue in self.queues]
        #: Most deliveries per queue before a message is dead-lettered unrun (None: no limit).
        self.delivery_limits = {q: app.delivery_limit(q) for q in self.queues}
        #: This worker's queues of broadcast tasks (bound at :meth:`start`, removed at :meth:`stop`).
        self.broadcast = WorkerBroadcast(self)
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
        #: Partitions, key lanes and holds of ordered tasks (set up with the consumer).
        self._ordering: OrderedDeliveries | None = None
        #: The worker threads.
        self._pool = ThreadPool(self._work, self._outcome, self._post)
        #: The running tasks, their time limits and the event loop of coroutine tasks.
        self._execution = Execution(self)
        #: The batches of batch tasks being collected (see ``mqtasks.execution.batch``).
        self._batches = Batches(self)
        #: Set when this process should be replaced: threads past their hard time limit
        #: pile up (``max_abandoned_threads``).
        self.recycle = threading.Event()
        self.recycle_reason: str | None = None  #: Why :attr:`recycle` is set.
        #: Revoked task ids, asked before each message runs (None: no revocations).
        self.revocations: _revoke.Revocations | None = None
        self._io_calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
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
        """Connect, declare the queues (and the bindings of the subscribers among
        them) and start consuming in background threads.

        Raises:
            ConnectionFailed: The broker cannot be reached.
            ConfigurationError: A queue configuration the broker cannot honour.
        """
        self._bind_hooks()
        if self.app.has_backend:
            check_backend(self.app)
            if self.revocations is None:
                self.revocations = _revoke.Revocations(self)
                self.revocations.start()  # reads the stored ones (up to 10 s), then watches
        # Bindings before consuming: an event emitted once this worker runs reaches its queue.
        self.subscriptions = self.app.declare_events(self.queues)
        self.broadcast.start()  # bound before consumed: a call sent once it runs reaches it
        self._hooks.worker_boot(self)
        if any(task.is_async for task in self.app.tasks.values()):
            self._execution.loop()
        self._pool.start(self.concurrency)
        self._io_thread = threading.Thread(target=self._io_main, name="mqtasks-io", daemon=True)
        self._io_thread.start()
        self._ready.wait(timeout)
        if self._startup_error is not None:
            self._stop_revocations()
            self._pool.stop(join=self.clean_exit)
            self._execution.stop()
            self.broadcast.stop()
            raise self._startup_error
        for warning in broker_warnings(self.app, self.queues):
            logger.warning("broker.unsafe_config", detail=warning)
        warn_stale_bindings(self.app, self.subscriptions)
        logger.info(
            "worker.started",
            queues=self.queues,
            **(
                {"subscriptions": [(s.pattern, s.queue) for s in self.subscriptions]}
                if self.subscriptions
                else {}
            ),
            concurrency=self.concurrency,
            prefetch=self.prefetch,
            broker=repr(self.app.transport),
        )

    def _bind_hooks(self) -> None:
        # The app's middleware; with a result backend, Idempotency (run-once
        # tasks), Workflow, which continues chains and chords, and Results,
        # which stores each outcome; and last Retries, the decision on failures,
        # whatever the app installs. after_process hooks run in reverse: Retries
        # decides, Results stores, Workflow continues from the stored outcome
        # (current_outcome()), Idempotency records the id as done only then,
        # and the app's middleware see it. Flow control (circuits, rate and
        # concurrency limits) comes right after the app's middleware. Bound again
        # at start, as the app's list may change.
        stack = with_flow_control(self.app.middleware, self.app)
        if self.app.has_backend:
            stack = with_results(with_workflow(with_idempotency(stack)))
        self._hooks = Runner(with_retries(stack))

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
        self._stop_revocations()
        self._pool.stop(join=self.clean_exit)
        self._execution.stop()
        self.broadcast.stop()
        if self.clean_exit:  # every thread has exited: nobody writes to the pipe any more
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._hooks.worker_shutdown(self)
        logger.info("worker.stopped", clean=self.clean_exit)
        return self.clean_exit

    def _stop_revocations(self) -> None:
        revocations, self.revocations = self.revocations, None
        if revocations is not None:
            revocations.stop()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the worker has stopped; return whether it has."""
        return self._done.wait(timeout)

    @property
    def idle(self) -> bool:
        """True when no delivery is held: none running, waiting or unsettled."""
        return self._outstanding == 0

    @property
    def running(self) -> int:
        """Tasks executing right now (busy slots)."""
        return self._running

    busy = running

    def terminate(self, task_id: str, *, reason: str = "revoked") -> bool:
        """Stop task ``task_id`` if it runs here, as its hard time limit would.

        Its message is dead-lettered with ``reason`` and acked (see
        ``mqtasks.execution.running`` for what stopping a thread means).

        Returns:
            False if it is not running in this worker.
        """
        return self._execution.terminate(task_id, reason)

    def resize(self, concurrency: int) -> None:
        """Run ``concurrency`` worker threads from now on (at least 1); thread-safe.

        Threads beyond it exit after their current task. Prefetch follows (2 x
        concurrency) unless it was given, where the transport can change it."""
        concurrency = max(1, int(concurrency))
        with self._lock:
            current, self.concurrency = self.concurrency, concurrency
            if current == concurrency:
                return
            if not self._prefetch_given:
                self.prefetch = 2 * concurrency
        if self._io_thread is not None:
            self._pool.resize(current, concurrency)
            if not self._prefetch_given:
                self._io_calls.put(self._apply_prefetch)
                self._wake()
        logger.info(
            "worker.resized", concurrency=concurrency, previous=current, prefetch=self.prefetch
        )

    @property
    def execution(self) -> Execution:
        """The running tasks, and counts of those done and failed."""
        return self._execution

    def call_on_io(self, call: Callable[[Consumer], None]) -> None:
        """Have the I/O thread, which alone touches the consumer, run ``call(consumer)`` soon."""
        self._io_calls.put(lambda: call(self._consumer) if self._consumer is not None else None)
        self._wake()

    def _apply_prefetch(self) -> None:
        set_prefetch = getattr(self._consumer, "set_prefetch", None)
        if set_prefetch is not None:
            set_prefetch(self.prefetch)

    # -- the I/O thread -----------------------------------------------------------

    def _io_main(self) -> None:
        try:
            specs = [self.app.queue(q) for q in self.queues] + self.broadcast.specs
            self._consumer = self.app.transport.consumer(specs, prefetch=self.prefetch)
            check_consumer(self.app, self.queues, self._consumer)
            self._consumer.start(self._on_delivery)
            self._generation = self._consumer.generation
            self._ordering = ordered_deliveries(
                self.app,
                self.queues,
                self._consumer,
                dispatch=self._work.put,
                counted=lambda delivery: self._count_settled(delivery, _REQUEUE),
                wake=self._wake,
            )
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
                while not self._io_calls.empty():
                    self._io_calls.get_nowait()()
                if self._ordering is not None:
                    self._ordering.poll()  # ownership changes; holds and gaps now due
                if consumer.wakeable:
                    # Sleeps until a delivery, a settlement or a stop arrives. A
                    # settlement posted before the flag was raised is seen here,
                    # one posted after it writes to the pipe (see _post).
                    self._io_sleeping = True
                    idle = self._settlements.empty() and not self._stopping.is_set()
                    consumer.wait(self._pause(0.5) if idle else 0.0, self._wake_r)
                    self._io_sleeping = False
                    self._clear_wake()
                elif self._window >= self.prefetch:
                    # Nothing can arrive until something is settled: wait for that.
                    with contextlib.suppress(queue.Empty):
                        self._settle(*self._settlements.get(timeout=0.5))
                    consumer.heartbeat_check()
                else:
                    consumer.drain(timeout=0.02 if self._window else self._pause(0.5))
                if consumer.generation != self._generation:
                    self._generation = consumer.generation
                    self._window = 0  # the broker took back the old connection's messages
                    if self._ordering is not None:
                        self._ordering.reset()
            self._shutdown(consumer)
        except BaseException:  # pragma: no cover - a bug; keep the process honest
            logger.exception("worker.io_crashed")
            self.clean_exit = False
            consumer.close()
        finally:
            if self._ordering is not None:
                self._ordering.close()  # leases released once nothing of theirs is held
            self._done.set()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: the I/O thread is already due to wake
            os.write(self._wake_w, b"\0")

    def _clear_wake(self) -> None:
        with contextlib.suppress(OSError):  # empty
            while len(os.read(self._wake_r, 4096)) == 4096:
                pass

    def _pause(self, longest: float) -> float:
        """Seconds the I/O thread may sleep: ``longest``, or until a held retry is due."""
        due = self._ordering.next_due() if self._ordering is not None else None
        return longest if due is None else min(longest, due)

    def _on_delivery(self, delivery: Delivery) -> None:
        self._outstanding += 1
        self.received += 1
        self._window += 1
        ordering = self._ordering
        if ordering is not None and ordering.arrive(delivery, stopping=self._stopping.is_set()):
            return  # a partition's: its key lane dispatches it
        if self._stopping.is_set():
            self._settle(delivery, _REQUEUE)
            return
        self._work.put(delivery)

    def _settle(self, delivery: Delivery, action: str) -> None:
        # I/O thread only: it alone touches the connection and these counters.
        consumer = self._consumer
        assert consumer is not None
        ordering = self._ordering
        if ordering is not None and action in (_HOLD, _REQUEUE) and ordering.tracks(delivery):
            # Held in place (unacked, run again later), or handed back with its key's others.
            if action == _HOLD and not self._stopping.is_set():
                ordering.hold(delivery)
            else:
                ordering.requeue(delivery)
            return
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
        if self._ordering is not None:
            self._ordering.settled(delivery)  # the next of its key may run

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
                delivery = self._work.get_nowait()
                if delivery is not None and not isinstance(delivery, BatchDue):
                    self._settle(delivery, _REQUEUE)
        for held in self._batches.close():  # batches not started: handed back too
            self._settle(held, _REQUEUE)
        if self._ordering is not None:
            self._ordering.shutdown()  # the rest of the key lanes, in order, retries held included
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

    def _post(self, item: tuple[Delivery, str]) -> None:
        """Hand a settlement to the I/O thread (from a worker thread or the watchdog)."""
        if item[1] == _BATCHED:  # held in a batch: its run posts the settlement
            return
        self._settlements.put(item)
        # Read after the put: an I/O thread that raised the flag before it
        # checks the queue either sees the item or is woken here.
        if self._io_sleeping:
            self._wake()

    def _outcome(self, delivery: Delivery) -> str:
        """Run ``delivery`` (worker thread); return its settlement."""
        if isinstance(delivery, BatchDue):
            return self._batches.run_due(delivery)
        consumer = self._consumer
        if consumer is not None and delivery.generation != consumer.generation:
            # The connection it came on is gone and the broker delivers it again.
            return _DROP
        if self._stopping.is_set():
            return _REQUEUE
        with self._lock:
            self._running += 1
        action = _REJECT
        try:
            # A fresh copy of the thread's context per message: what the
            # task or a middleware binds (structlog contextvars, the
            # OpenTelemetry context) ends with the message.
            action = contextvars.copy_context().run(process, self, delivery)
        except BaseException:  # pragma: no cover - process() handles task errors
            logger.exception("worker.process_crashed", message_id=delivery.message_id)
        finally:
            if action != _ABANDONED:  # else counted off when it was given up
                with self._lock:
                    self._running -= 1
        return action

    # -- what the deciding middleware calls (Retries, Results) ------------------------

    @property
    def decided(self) -> bool:
        """Whether the message this thread processes is retried or dead-lettered already."""
        job = job_or_none()
        return job is not None and job.action is not None

    @property
    def current_task_id(self) -> str | None:
        """The id of the message this thread processes (also when it could not be decoded)."""
        job = job_or_none()
        return job.delivery.message_id if job is not None else None

    def retry(
        self, message: Message, retry: Message, delay: float, exception: BaseException
    ) -> None:
        """Publish ``retry``, the next attempt of ``message``, held ``delay`` s; then ack ``message``.

        For the deciding middleware's ``after_process`` (:class:`~mqtasks.middleware.retries.Retries`).
        The body goes as received; if the broker refuses it, ``message`` is requeued instead.

        A message of an ordered task waits in place instead: unacked, run again as
        ``retry`` after ``delay`` s, its key's later tasks waiting behind it.

        Raises:
            ConfigurationError: The transport cannot hold a delay; nothing was published.
        """
        _decisions.retry(self, message, retry, delay, exception)

    def dead_letter(
        self, message: Message, reason: str, detail: str, exception: BaseException | None = None
    ) -> None:
        """Publish ``message`` to its dead-letter queue with ``reason``, confirmed; then ack it.

        For the deciding middleware's ``after_process``; if the dead-letter
        queue cannot be written, ``message`` is requeued instead.
        """
        job = current_job()
        job.action = dead_letter(self, job.delivery, message, reason, detail, exception)

    def defer(self, message: Message, delay: float, reason: str) -> None:
        """Publish ``message`` again as received (same attempt), held ``delay`` s; then ack it.

        For middleware that cannot let the message end now (the result backend
        is down, another copy holds its lease): from ``after_process``, or from
        ``before_process`` followed by ``raise SkipMessage``. The body goes as
        received; if the broker refuses the publish (or cannot hold a delay),
        ``message`` is requeued instead. The task runs again once the delay is
        over, so it may run more than once.

        Args:
            message: The message being processed.
            delay: Seconds the broker holds it.
            reason: Why, for the log (``result_store_failed``...).

        A message of an ordered task waits in place instead (see :meth:`retry`).
        """
        _decisions.defer(self, message, delay, reason)
