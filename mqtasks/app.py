"""App: settings, the task and subscriber registries, middleware, the (lazy) transport and
result backend."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, overload

from . import dlq
from . import events as _events
from . import publishing as _publishing
from . import queues as _queues
from . import revoke as _revoke
from . import streams as _streams
from .batch_task import BatchDecorator, define
from .config import Settings, TLSOptions, mask_url
from .declarations import EventsAPI, PeriodicAPI
from .events import EventHandle, Subscription, Subscriptions
from .exceptions import ConfigurationError, TaskNotRegistered
from .flow.circuit import CircuitBreaker, circuits_by_name
from .message import Message
from .middleware import Middleware, default_middleware
from .middleware.base import Runner
from .middleware.results import Results
from .periodic import PeriodicRegistry
from .publishing import Publishing
from .retry import RetryPolicy
from .status import QueueStatus, queue_status
from .streams import StartAt, StreamSpec
from .task import BASE_OPTIONS, P, R, Task, TaskHandle
from .transport import QueueSpec, Transport, resolve
from .types import Seconds
from .validation import check_app

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .backend.base import Backend
    from .publishing import LoopBatcher
    from .transport import Envelope

__all__ = ["App"]


class App(EventsAPI, PeriodicAPI):
    """A mqtasks application: where tasks are registered and sent from.

    Args:
        name: The app's name (used in logs and for tasks defined in ``__main__``).
        broker: Broker URL; ``MQTASKS_BROKER_URL`` or ``memory://`` when omitted.
        backend: Result backend URL (``redis://``, ``postgresql://``, ``memory://``);
            ``MQTASKS_BACKEND_URL`` when omitted; none: results are not stored.
        settings: Full settings; built from the environment when omitted.
        queues: Queue configurations; queues not listed get the defaults.
        middleware: Middleware instances, replacing the default stack
            (:func:`~mqtasks.middleware.default_middleware`, picked by the settings).
        retry_policy: The retry policy of tasks that set none of their own
            (``RetryPolicy()``: 3 retries, exponential backoff with jitter).
        circuits: :class:`~mqtasks.CircuitBreaker` declarations, shared by every
            worker through the result backend; a task joins one with
            ``@app.task(circuit=name)``.
        streams: Replayable event streams (``StreamSpec``), emitted to
            with ``emit(..., stream=name)`` and read with ``@app.on(..., stream=name)``;
            see ``mqtasks.streams``. Refused on brokers without streams.
        overrides: Individual :class:`~mqtasks.config.Settings` fields.

    Example::

        app = App("shop", broker="amqp://guest:guest@localhost//")

        @app.task
        def add(x: int, y: int) -> int:
            return x + y

        add.delay(2, 3)
    """

    def __init__(
        self,
        name: str = "mqtasks",
        broker: str | None = None,
        *,
        backend: str | None = None,
        settings: Settings | None = None,
        queues: Iterable[QueueSpec] = (),
        middleware: Iterable[Middleware] | None = None,
        retry_policy: RetryPolicy | None = None,
        circuits: Iterable[CircuitBreaker] = (),
        streams: Iterable[StreamSpec] = (),
        **overrides: Any,
    ) -> None:
        self.name = name
        #: Circuit breakers by name; tasks join one with ``@app.task(circuit=name)``.
        self.circuits: dict[str, CircuitBreaker] = circuits_by_name(circuits)
        #: Default retry policy of the app's tasks.
        self.retry_policy = retry_policy if retry_policy is not None else RetryPolicy()
        if settings is None:
            settings = Settings.from_env(broker_url=broker, backend_url=backend, **overrides)
        else:
            settings = settings.replace(broker_url=broker, backend_url=backend, **overrides)
        #: The app's settings.
        self.settings: Settings = settings
        #: Registered tasks by name (subscribers included).
        self.tasks: dict[str, Task[Any, Any]] = {}
        #: Event subscribers (``@app.on``), one per queue: iterate for
        #: :class:`~mqtasks.events.Subscription` objects, ``(pattern, queue, task)``.
        self.subscriptions = Subscriptions()
        #: Periodic schedules (:meth:`periodic`, :meth:`add_periodic`), sent by ``mqtasks beat``.
        self.schedules = PeriodicRegistry()
        #: Subscriptions whose bindings this app has declared (see :meth:`emit`).
        self._bound: set[Subscription] = set()
        #: Queue configurations by name.
        self.queues: dict[str, QueueSpec] = {}
        for spec in queues:
            self.add_queue(spec)
        #: Installed middleware, in order.
        self.middleware: list[Middleware] = (
            list(middleware) if middleware is not None else default_middleware(settings)
        )
        #: Replayable streams by name (``mqtasks.streams``).
        self.streams = _streams.stream_specs(name, settings.broker_url, streams)
        self._streams_declared: set[str] = set()
        if self.streams:
            self.middleware.append(_streams.StreamPumps())
        self._runner = Runner(self.middleware)
        self._transport: Transport | None = None
        self._backend: Backend | None = None
        self._lock = threading.Lock()
        #: Queues whose ignored priorities were already reported (once per queue).
        self._priority_checked: set[str] = set()
        #: The adelay() batcher of each event loop (see mqtasks.publishing).
        self._batchers: weakref.WeakKeyDictionary[Any, LoopBatcher] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        s = self.settings
        backend = "" if s.backend_url is None else f" backend={mask_url(s.backend_url)!r}"
        return f"<App {self.name!r} broker={mask_url(s.broker_url)!r}{backend} tasks={len(self.tasks)}>"

    # -- configuration -------------------------------------------------------

    @property
    def transport(self) -> Transport:
        """The transport for the broker URL, created on first use."""
        if self._transport is None:
            with self._lock:
                if self._transport is None:
                    s = self.settings
                    self._transport = resolve(
                        s.broker_url,
                        queue_type=s.queue_type,
                        publish_timeout=s.publish_timeout,
                        publish_retries=s.publish_retries,
                        pool_size=s.publish_pool_size,
                        heartbeat=s.heartbeat,
                        connect_timeout=s.connect_timeout,
                        transport_options=s.transport_options,
                        tls=s.tls,
                        # Settings refuses "replicated" for brokers other than Redis.
                        **({"durability": s.durability} if s.durability != "local" else {}),
                    )
        return self._transport

    @property
    def has_backend(self) -> bool:
        """Whether the app has a result backend URL (its workers store results)."""
        return self.settings.backend_url is not None

    @property
    def backend(self) -> Backend:
        """The result backend for the backend URL, created on first use.

        Raises:
            ConfigurationError: The app has no result backend URL, or it names
                no backend (the message says which schemes exist).
        """
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    s = self.settings
                    if s.backend_url is None:
                        raise ConfigurationError(
                            f"App {self.name!r} has no result backend: "
                            "App(..., backend='redis://...') or MQTASKS_BACKEND_URL."
                        )
                    from .backend import resolve as resolve_backend

                    options: dict[str, Any] = {}
                    if s.tls != TLSOptions():
                        # Set TLS options apply to the backend too; the defaults leave
                        # it to the URL (rediss:// verifies, postgresql:// as libpq does).
                        options["tls"] = s.tls
                    if s.backend_key_prefix is not None:
                        options["key_prefix"] = s.backend_key_prefix
                    self._backend = resolve_backend(s.backend_url, **options)
        return self._backend

    def handle(self, task_id: str) -> TaskHandle:
        """Return the handle of task ``task_id`` (an id kept from an earlier ``delay()``).

        Its ``task`` and ``queue`` are None: only the id is known.
        """
        return TaskHandle(task_id, app=self)

    def revoke(self, task_id: str, *, terminate: bool = False) -> str:
        """Revoke task ``task_id``: workers dead-letter it (reason ``revoked``), not run it;
        ``terminate`` also stops it where it runs (see ``mqtasks.revoke``). Returns its
        state: ``REVOKED``, or the final one it had reached already.

        Raises:
            ConfigurationError: The app has no result backend (workers learn of revocations there).
            ValueError: ``task_id`` is empty, over 255 characters or holds a NUL.
            BackendError: The result backend cannot be reached.
        """
        return _revoke.revoke(self, task_id, terminate=terminate)

    def add_queue(self, spec: QueueSpec) -> None:
        """Add (or replace) a queue configuration."""
        self.queues[spec.name] = spec

    def queue(self, name: str) -> QueueSpec:
        """Return the configuration of queue ``name`` (the defaults if not configured);
        a partition of ordered tasks' queue gets that queue's (:mod:`mqtasks.ordering`)."""
        return _queues.queue_spec(self, name)

    def delivery_limit(self, name: str) -> int | None:
        """Return the most deliveries a message of queue ``name`` gets; None: no limit.

        The queue's ``QueueSpec.delivery_limit``, else the app's setting (``mqtasks.queues``).
        """
        return _queues.delivery_limit(self, name)

    def check(
        self,
        queues: Sequence[str] | None = None,
        *,
        concurrency: int | None = None,
        prefetch: int | None = None,
    ) -> None:
        """Check the configuration a worker of this app would run with; see
        :func:`mqtasks.validation.check_app` (workers run it when created).

        Raises:
            UnknownTransport: The broker URL names no transport.
            ConfigurationError: Every problem found, one per line.
        """
        self.transport  # noqa: B018 - resolving the URL is the first check
        check_app(self, queues, concurrency=concurrency, prefetch=prefetch)

    def task_queues(self) -> list[str]:
        """Return the names of all queues that registered tasks publish to."""
        return _queues.task_queues(self)

    def declare(self, queues: Sequence[str] | None = None) -> None:
        """Declare queues on the broker (all task queues by default)."""
        self.transport.declare([self.queue(q) for q in (queues or self.task_queues())])

    def declare_events(self, queues: Sequence[str] | None = None) -> list[Subscription]:
        """Declare the events exchange, and the queue and binding of each subscriber.

        Args:
            queues: Only the subscribers of these queues; every subscriber when None.

        Returns:
            The subscriptions whose bindings were declared, in registration order.

        Raises:
            ConfigurationError: The transport cannot route events.
            ConnectionFailed: The broker cannot be reached.
            TransportError: The broker refused a declaration.
        """
        return _events.declare_events(self, queues)

    # -- events and streams ---------------------------------------------------------

    def on(  # type: ignore[override]  # adds stream= and start=
        self,
        pattern: str,
        *,
        queue: str | None = None,
        name: str | None = None,
        priority: int | None = None,
        expires: Seconds | None = None,
        stream: str | None = None,
        start: StartAt = "last",
        **task_options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as the subscriber of events matching ``pattern``
        (see :doc:`/guide/events`).

        With ``stream``, it reads that stream's entries instead, as group ``queue``:
        ``start`` (``"first"``, ``"last"``, an aware datetime or an offset) is where
        the group starts when first created; afterwards it resumes where it stopped.

        Raises:
            ConfigurationError: As for events; an unknown stream or a bad ``start``.
        """
        if stream is None:
            return super().on(
                pattern, queue=queue, name=name, priority=priority, expires=expires, **task_options
            )
        _streams.spec_of(self, stream)
        return _events.subscribe(
            self,
            pattern,
            queue=queue,
            name=name,
            priority=priority,
            expires=expires,
            task_options=task_options,
            stream=stream,
            start=_streams.check_start(start),
        )

    def emit(
        self,
        event: str,
        payload: Any = None,
        *,
        mandatory: bool = True,
        headers: Mapping[str, Any] | None = None,
        event_id: str | None = None,
        stream: str | None = None,
    ) -> EventHandle:
        """Publish an event: every subscriber whose pattern matches ``event`` runs it once
        (see :doc:`/guide/events`).

        With ``stream``, append it to that stream instead (kept whoever reads it, so
        ``mandatory`` does not apply); see ``mqtasks.streams.emit_to_stream``.
        """
        if stream is None:
            return super().emit(
                event, payload, mandatory=mandatory, headers=headers, event_id=event_id
            )
        return _streams.emit_to_stream(
            self, stream, event, payload, headers=headers, event_id=event_id
        )

    # -- dead letters --------------------------------------------------------------

    def dead_letters(
        self, queue: str | None = None, limit: int | None = 100
    ) -> list[dlq.DeadLetter]:
        """Return up to ``limit`` dead-letter entries of ``queue`` (the default queue), oldest first.

        Non-destructive; see :func:`mqtasks.dlq.list_dead_letters`.
        """
        return dlq.list_dead_letters(self, queue or self.settings.default_queue, limit=limit)

    def replay_dead_letters(
        self,
        queue: str | None = None,
        *,
        ids: Sequence[str] | None = None,
        task: str | None = None,
        limit: int | None = None,
    ) -> int:
        """Send dead letters of ``queue`` back as first attempts; return how many.

        Each is removed from the dead-letter queue only after the broker confirmed
        its republish; see :func:`mqtasks.dlq.replay_dead_letters`.
        """
        return dlq.replay_dead_letters(
            self, queue or self.settings.default_queue, ids=ids, task=task, limit=limit
        )

    def purge_dead_letters(self, queue: str | None = None) -> int:
        """Delete every dead letter of ``queue``; return how many were deleted."""
        return dlq.purge_dead_letters(self, queue or self.settings.default_queue)

    def status(self, queues: Sequence[str] | None = None) -> list[QueueStatus]:
        """Return the status of ``queues`` (the task queues by default): ready,
        unacknowledged, delayed and dead-lettered messages and consumers.

        See :func:`mqtasks.status.queue_status`.
        """
        return queue_status(self, queues)

    def close(self) -> None:
        """Close the app's broker and result backend connections (reopened on next use)."""
        if self._transport is not None:
            self._transport.close()
        if self._backend is not None:
            self._backend.close()

    # -- tasks -----------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, *, batch_size: int, **options: Any) -> BatchDecorator: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        expires: Seconds | None = None,
        **options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(  # type: ignore[misc]  # mypy cannot match a ParamSpec across overloads here
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        expires: Seconds | None = None,
        **options: Any,
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task; usable as ``@app.task`` or ``@app.task(...)``.

        Args:
            fn: The function (when used without parentheses).
            name: Task name; ``module.qualname`` of the function by default.
            queue: Queue it is published to; the app's ``default_queue`` by default.
            priority: Default message priority.
            expires: Default seconds after publishing past which it is not run.
            options: Options understood by installed middleware.

        Raises:
            ConfigurationError: An option no installed middleware understands, an
                async generator function, a time limit that is not positive
                seconds, or a soft time limit above the hard one.
            DuplicateTask: Another function is registered under the same name.
        """
        # Results is installed by the worker (when the app has a backend), not in
        # app.middleware: its options are known all the same.
        known = BASE_OPTIONS.union(Results.task_options, *(m.task_options for m in self.middleware))
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigurationError(
                f"Unknown task option(s) {unknown}. Known options: {sorted(known)}. "
                "Did you forget to add a middleware?"
            )

        def register(func: Callable[P, R]) -> Task[P, R]:
            return define(self, func, name, queue, priority, expires, options)

        if fn is not None:
            return register(fn)
        return register

    def _default_name(self, fn: Callable[..., Any]) -> str:
        module = getattr(fn, "__module__", None) or self.name
        if module == "__main__":
            module = self.name
        return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"

    def get_task(self, name: str) -> Task[Any, Any]:
        """Return the task registered as ``name``.

        Raises:
            TaskNotRegistered: No such task; the message lists the registered ones.
        """
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(sorted(self.tasks)[:20]) or "none"
            raise TaskNotRegistered(
                f"Task {name!r} is not registered (registered: {known})."
            ) from None

    # -- publishing -------------------------------------------------------------

    @property
    def _hooks(self) -> Runner:
        """The runner of :attr:`middleware` (which users may replace at any time)."""
        runner = self._runner
        if runner.middleware is not self.middleware:
            runner = self._runner = Runner(self.middleware)
        return runner

    def publishing(self, window: int | None = None) -> Publishing:
        """Return a block in which ``delay()`` returns at once and the exit waits for every confirm.

        ::

            with app.publishing():
                for order in orders:
                    charge.delay(order.id)  # a pending handle, at once
            # here every message is confirmed, or BulkPublishError was raised

        Only this app's tasks sent from this thread go through the block; see
        :mod:`mqtasks.publishing` for what it guarantees.

        Args:
            window: Most messages gathered before they are handed to the broker;
                the transport's confirm window (or 500) when None.

        Raises:
            ValueError: ``window`` is below 1.
        """
        return Publishing(self, window)

    def send(
        self, message: Message, *, names: list[str] | None = None, delay: float | None = None
    ) -> TaskHandle:
        """Encode and publish ``message``, running the publish middleware.

        Inside a :meth:`publishing` block of this app (in this thread), the
        message is handed to the block and the handle returned is pending.

        Args:
            message: What to send.
            names: Parameter names of the task's positional arguments, for errors.
            delay: Seconds the broker holds the message before a worker gets it.

        Returns:
            The message's handle.

        Raises:
            EncodeError: Arguments JSON cannot carry, or a body over ``max_message_size``.
            PublishError: The broker did not take the message.
        """
        return _publishing.send(self, message, names=names, delay=delay)

    async def asend(
        self, message: Message, *, names: list[str] | None = None, delay: float | None = None
    ) -> TaskHandle:
        """:meth:`send` for asyncio code: return once the broker has confirmed ``message``.

        Calls awaited together share one pipelined publish, made in a thread
        (see :mod:`mqtasks.publishing`); the checks run at the call.

        Raises:
            EncodeError: Arguments JSON cannot carry, or a body over ``max_message_size``.
            PublishError: The broker did not take the message.
        """
        return await _publishing.asend(self, message, names=names, delay=delay)

    def _prepare(self, message: Message, names: list[str] | None) -> tuple[Message, Envelope]:
        """Run ``before_publish`` and encode; on an error, run ``after_publish_error`` and raise."""
        return _publishing.prepare(self, message, names)

    def send_many(self, messages: Iterable[Message]) -> list[TaskHandle]:
        """Publish many messages at once, with the broker's confirms pipelined.

        Every message is encoded (and checked) before the first is published.
        Returns once the broker has confirmed all of them.

        Raises:
            EncodeError: A message cannot be encoded; nothing was published.
            BulkPublishError: Some messages were not enqueued; ``.sent`` and
                ``.failed`` say which.
        """
        return _publishing.send_many(self, messages)
