"""Task: a registered function that can be called locally or sent to a worker."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

import structlog

from .broadcast import broadcast_option, refuse_in_workflow
from .broadcast import send as broadcast_send
from .exceptions import ConfigurationError
from .flow.options import FLOW_OPTIONS, FlowOptions, flow_options
from .handle import Confirmation, TaskHandle
from .message import Message
from .ordering.options import OPTIONS as ORDERING_OPTIONS
from .ordering.options import Ordering, ordering_of
from .outbox import send_in_transaction
from .retry import RetryPolicy
from .serialization import encode_body
from .types import Seconds, to_seconds
from .unique import Claim, argument_key, claim, explicit_key, release

if TYPE_CHECKING:
    from .app import App
    from .canvas import Signature
    from .config import Settings

# Confirmation and TaskHandle are defined in mqtasks.handle and still importable from here.
__all__ = ["Confirmation", "Task", "TaskHandle", "refuse_awaitable"]

logger = structlog.get_logger("mqtasks.task")

P = ParamSpec("P")
R = TypeVar("R")

#: Options every task accepts, whatever middleware is installed.
BASE_OPTIONS = frozenset(
    {
        "name",
        "queue",
        "priority",
        "expires",
        "max_retries",
        "retry_backoff",
        "retry_on",
        "dont_retry_on",
        # Every running worker of the queue runs each call (see mqtasks.broadcast).
        "broadcast",
        # At most one message per call within this window (see mqtasks.unique).
        "unique_for",
        # Run once per task id: read by the Idempotency middleware, which workers
        # install when the app has a result backend.
        "idempotent",
        # Ordered processing by key (see mqtasks.ordering).
        *ORDERING_OPTIONS,
        # Seconds before SoftTimeLimitExceeded is raised in the task, and before
        # the worker stops it and dead-letters it (see mqtasks.execution).
        "soft_time_limit",
        "time_limit",
        # Rate and concurrency limits, circuits and batches (see mqtasks.flow).
        *FLOW_OPTIONS,
    }
)

#: Where to set a result backend, for the errors of options that need one.
_BACKEND_HINT = "App(..., backend='redis://...') or MQTASKS_BACKEND_URL"


def _delay(countdown: Seconds | None, eta: datetime | None) -> float | None:
    if countdown is not None and eta is not None:
        raise TypeError("pass countdown or eta, not both")
    if eta is not None:
        if eta.tzinfo is None:
            raise ConfigurationError("eta must be an aware datetime (with a tzinfo).")
        return max(0.0, (eta - datetime.now(timezone.utc)).total_seconds())
    return to_seconds(countdown)


def _expires_at(expires: Seconds | datetime | None) -> datetime | None:
    if expires is None:
        return None
    if isinstance(expires, datetime):
        if expires.tzinfo is None:
            raise ConfigurationError("expires must be an aware datetime (with a tzinfo).")
        return expires.astimezone(timezone.utc)
    seconds = to_seconds(expires)
    assert seconds is not None
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


def _is_coroutine_function(fn: Callable[..., Any], name: str) -> bool:
    """Whether calling ``fn`` makes a coroutine (an ``async def`` function or object).

    Raises:
        ConfigurationError: ``fn`` (or, for a callable object, its ``__call__``)
            is an async generator function: it yields many values, and a task
            returns one; nothing would consume it.
    """
    for candidate in (fn, type(fn).__call__):
        if inspect.isasyncgenfunction(candidate):
            raise ConfigurationError(
                f"Task {name!r} is an async generator function: a task returns one value, "
                "and nothing would iterate over what it yields. Make it an async def "
                "function that returns a value (collect the items into a list)."
            )
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _time_limits(
    name: str, options: dict[str, Any], settings: Settings
) -> tuple[float | None, float | None]:
    """The task's (soft, hard) time limits in seconds: its options, else the app's defaults.

    Raises:
        ConfigurationError: A limit that is not positive seconds, or a soft limit above
            the hard one.
    """
    limits: list[float | None] = []
    for option in ("soft_time_limit", "time_limit"):
        given = options.pop(option, None)
        try:
            seconds = to_seconds(given)
        except (TypeError, ValueError):
            seconds = -1.0
        if given is not None and (seconds is None or isinstance(given, bool) or not seconds > 0):
            raise ConfigurationError(
                f"Task {name!r}: {option} must be positive seconds (or a timedelta), not {given!r}."
            )
        limits.append(seconds if given is not None else getattr(settings, option))
    soft, hard = limits
    if soft is not None and hard is not None and soft > hard:
        raise ConfigurationError(
            f"Task {name!r}: soft_time_limit ({soft:g} s) is above time_limit ({hard:g} s) "
            "(the task's options or the app's defaults): it would be stopped before it is "
            "warned. Set the soft limit below the hard one."
        )
    return soft, hard


def refuse_awaitable(result: Any, task: str) -> ConfigurationError | None:
    """Return the error a task call means when it returned an async generator.

    (A coroutine or other awaitable is run on the worker's event loop.) Any
    other result: None.

    Args:
        result: What the task function returned.
        task: The task's name, for the message.
    """
    if not inspect.isasyncgen(result):
        return None
    return ConfigurationError(
        f"Task {task!r} returned {type(result).__name__!r}, an async generator: a task "
        "returns one value, and nothing would iterate over it; its body did not run. "
        "Make it an async def function that returns a value."
    )


class Task(Generic[P, R]):
    """A function registered with an :class:`~mqtasks.App`.

    Call it to run it here; :meth:`delay` or :meth:`apply_async` to have a worker
    run it. Created by :meth:`~mqtasks.app.App.task`, not directly.

    An ``async def`` function is a coroutine task: a worker runs it on its event
    loop (see ``mqtasks.execution``); :meth:`delay` stays synchronous, and
    :meth:`adelay` publishes from asyncio code.

    Raises:
        ConfigurationError: ``fn`` is an async generator function; a time limit
            that is not positive seconds, or a soft one above the hard one; or
            ``unique_for`` or ``idempotent=True`` on an app with no result
            backend URL (they keep their keys there).
    """

    def __init__(
        self,
        fn: Callable[P, R],
        app: App,
        *,
        name: str,
        queue: str,
        priority: int | None = None,
        expires: Seconds | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        #: Whether calling the function makes a coroutine, run on the worker's event loop.
        self.is_async: bool = _is_coroutine_function(fn, name)
        self.fn = fn
        self.app = app
        self.name = name
        self.queue = queue
        self.priority = priority
        self.expires = to_seconds(expires)
        #: Options for middleware (for example retry settings in later releases).
        self.options: dict[str, Any] = dict(options or {})
        #: When a failure of this task is retried, and after how long.
        self.retry_policy: RetryPolicy = app.retry_policy.replace(
            max_retries=self.options.pop("max_retries", None),
            backoff=self.options.pop("retry_backoff", None),
            retry_on=self.options.pop("retry_on", None),
            dont_retry_on=self.options.pop("dont_retry_on", None),
        )
        #: Seconds a call's key (its name and arguments) holds, during which the same
        #: call publishes nothing (see :mod:`mqtasks.unique`); None: every call publishes.
        self.unique_for: float | None = to_seconds(self.options.pop("unique_for", None))
        if self.unique_for is not None and not self.unique_for > 0:
            raise ConfigurationError(
                f"Task {name!r}: unique_for must be positive seconds, not {self.unique_for!r}."
            )
        for option, given in (
            ("unique_for", self.unique_for is not None),
            ("idempotent=True", bool(self.options.get("idempotent"))),
        ):
            if given and not app.has_backend:
                raise ConfigurationError(
                    f"Task {name!r} sets {option}, which keeps its keys in the result "
                    f"backend, and app {app.name!r} has none: {_BACKEND_HINT}."
                )
        #: Seconds a run may take before :exc:`~mqtasks.exceptions.SoftTimeLimitExceeded`
        #: is raised in it, and before the worker stops it and dead-letters its message
        #: (reason ``time_limit``); None: no limit. The task's options, else the app's settings.
        self.soft_time_limit, self.time_limit = _time_limits(name, self.options, app.settings)
        #: Rate and concurrency limits, circuit and batching (:mod:`mqtasks.flow`).
        self.flow: FlowOptions = flow_options(
            name, fn, self.options, has_backend=app.has_backend, circuits=app.circuits
        )
        #: Whether every running worker of its queue runs each call (:mod:`mqtasks.broadcast`).
        self.broadcast: bool = broadcast_option(self)
        self.signature = inspect.signature(fn)
        #: How calls are ordered by key (``ordering_key``), or None.
        self.ordering: Ordering | None = ordering_of(
            name,
            queue,
            fn,
            self.options,
            priority=priority,
            has_backend=app.has_backend,
            others=app.tasks.values(),
        )
        self._names = [
            p.name
            for p in self.signature.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        params = list(self.signature.parameters.values())
        # (required, most) positional arguments when every parameter is a plain
        # positional one: a call that fits them needs no Signature.bind().
        self._arity: tuple[int, int] | None = None
        if len(self._names) == len(params):
            required = sum(1 for p in params if p.default is p.empty)
            self._arity = (required, len(params))
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__module__ = getattr(fn, "__module__", None)  # type: ignore[assignment]
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue!r}>"

    def check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Check that ``args`` and ``kwargs`` fit the function's signature.

        Raises:
            TypeError: They do not (the message is ``Signature.bind()``'s).
        """
        arity = self._arity
        # Signature.bind() is slow for a call made on every publish and every run;
        # positional arguments within the function's count always bind.
        if arity is not None and not kwargs and arity[0] <= len(args) <= arity[1]:
            return
        self.signature.bind(*args, **kwargs)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here and now, like a plain call."""
        return self.fn(*args, **kwargs)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle:
        """Send the call to a worker; return once the broker has confirmed it.

        Inside ``with app.publishing():`` (see :mod:`mqtasks.publishing`) it
        returns at once with a pending handle, and the block waits for the
        broker's confirm.

        Raises:
            TypeError: The arguments do not fit the function's signature.
            EncodeError: An argument cannot be sent as JSON, or the message is too large.
            PublishError: The message was not enqueued.
            ConfigurationError: ``connection=`` on a broker other than ``postgresql://``.

        ``connection=conn`` (unless the function has a parameter of that name)
        publishes in that transaction, as :meth:`apply_async` does; type checkers
        know only the function's parameters, so typed code calls ``apply_async``.
        """
        if "connection" in kwargs and "connection" not in self.signature.parameters:
            options = dict(kwargs)
            connection = options.pop("connection")
            return self.apply_async(args, options, connection=connection)
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        headers: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        expires: Seconds | datetime | None = None,
        countdown: Seconds | None = None,
        eta: datetime | None = None,
        idempotency_key: str | None = None,
        connection: Any = None,
    ) -> TaskHandle:
        """Send the call with options; return once the broker has confirmed it.

        Args:
            args: Positional arguments.
            kwargs: Keyword arguments.
            queue: Queue to publish to instead of the task's.
            priority: Message priority (0-255, higher first; RabbitMQ orders it only on
                a classic queue with ``max_priority``, see :doc:`/guide/transports`).
            headers: Extra headers, passed through to the worker.
            task_id: The message id to use; a new UUID by default. Reusing an id when
                retrying a failed ``delay()`` makes duplicates detectable.
            expires: Seconds from now, or an aware datetime, after which a worker
                rejects the task instead of running it.
            countdown: Seconds the broker holds the message before a worker gets it.
            eta: An aware datetime before which no worker gets it (instead of ``countdown``).
            idempotency_key: Publish nothing if a call of this task with the same key
                was published within the window (the task's ``unique_for``, else the
                app's ``result_expires``); the handle of that call is returned instead
                (:attr:`TaskHandle.duplicate <mqtasks.handle.TaskHandle.duplicate>`).
                Needs a result backend.
            connection: A psycopg 3 connection to the ``postgresql://`` broker's
                database: the message is inserted in its current transaction, and
                published only if that transaction commits (the outbox); a
                rollback publishes nothing. Returns once inserted (not gathered
                by a publishing block). See :doc:`/guide/postgres-broker`.

        Returns:
            The message's handle; pending inside a publishing block (as for :meth:`delay`).

        Raises:
            TypeError: The arguments do not fit the function's signature.
            EncodeError: An argument cannot be sent as JSON, or the message is too large.
            PublishError: The message was not enqueued (its uniqueness key is given back).
            ConfigurationError: ``idempotency_key`` on an app with no result backend.
            BackendError: The result backend cannot be reached to claim the key
                (nothing was published).
            ConfigurationError: ``connection`` on a broker other than
                ``postgresql://``, or with a broadcast task or a uniqueness key.
        """
        delay = _delay(countdown, eta)
        message = self.message(
            args,
            kwargs,
            queue=queue,
            priority=priority,
            headers=headers,
            task_id=task_id,
            expires=expires,
        )
        if connection is not None:
            return send_in_transaction(self, message, delay, idempotency_key, connection)
        if self.broadcast:
            return broadcast_send(
                self, message, delay=delay, idempotency_key=idempotency_key, queue=queue
            )
        unique = self._claim_for(message, idempotency_key)
        if unique is None:
            return self.app.send(message, names=self._names, delay=delay)
        backend = self.app.backend
        holder = claim(backend, unique, message.id)
        if holder is not None:
            return self._duplicate(unique, holder)
        try:
            handle = self.app.send(message, names=self._names, delay=delay)
        except Exception:
            release(backend, unique, message.id)
            raise
        confirmation = handle.confirmation
        if confirmation is not None:  # in a publishing block: its answer comes later
            confirmation.on_settle(
                lambda error: release(backend, unique, message.id) if error is not None else None
            )
        return handle

    async def adelay(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle:
        """Send the call from asyncio code; return once the broker has confirmed it.

        Calls awaited together (``asyncio.gather``) share one pipelined publish,
        made in a thread so the event loop keeps running; a lone call is
        published at once. The checks run at the call, as for :meth:`delay`.

        Raises:
            TypeError: The arguments do not fit the function's signature.
            EncodeError: An argument cannot be sent as JSON, or the message is too large.
            PublishError: The message was not enqueued.
        """
        return await self.aapply_async(args, kwargs)

    async def aapply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        headers: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        expires: Seconds | datetime | None = None,
        countdown: Seconds | None = None,
        eta: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> TaskHandle:
        """:meth:`apply_async` for asyncio code, pipelined as :meth:`adelay` is.

        The uniqueness key (``idempotency_key``, ``unique_for``) is claimed in
        a thread, so the event loop keeps running.

        Raises:
            TypeError: The arguments do not fit the function's signature.
            EncodeError: An argument cannot be sent as JSON, or the message is too large.
            PublishError: The message was not enqueued (its uniqueness key is given back).
            ConfigurationError: ``idempotency_key`` on an app with no result backend.
            BackendError: The result backend cannot be reached to claim the key.
        """
        delay = _delay(countdown, eta)
        message = self.message(
            args,
            kwargs,
            queue=queue,
            priority=priority,
            headers=headers,
            task_id=task_id,
            expires=expires,
        )
        if self.broadcast:
            return await asyncio.to_thread(
                broadcast_send,
                self,
                message,
                delay=delay,
                idempotency_key=idempotency_key,
                queue=queue,
            )
        unique = self._claim_for(message, idempotency_key)
        if unique is None:
            return await self.app.asend(message, names=self._names, delay=delay)
        backend = self.app.backend
        holder = await asyncio.to_thread(claim, backend, unique, message.id)
        if holder is not None:
            return self._duplicate(unique, holder)
        try:
            return await self.app.asend(message, names=self._names, delay=delay)
        except Exception:
            # Not on cancellation: the batched publish goes on without its caller.
            await asyncio.to_thread(release, backend, unique, message.id)
            raise

    def _claim_for(self, message: Message, idempotency_key: str | None) -> Claim | None:
        """Return the uniqueness key ``message`` must claim before it is published, if any.

        The message is encoded first, so a call that cannot be sent claims nothing.

        Raises:
            ConfigurationError: ``idempotency_key`` and the app has no result backend.
            EncodeError: The message cannot be encoded.
        """
        if idempotency_key is None and self.unique_for is None:
            return None
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not idempotency_key:
                raise TypeError(
                    f"idempotency_key must be a non-empty string, not {idempotency_key!r}"
                )
            if not self.app.has_backend:
                raise ConfigurationError(
                    f"apply_async(idempotency_key=...) of task {self.name!r} keeps the key "
                    f"in the result backend, and app {self.app.name!r} has none: {_BACKEND_HINT}."
                )
        encode_body(
            message.args,
            dict(message.kwargs),
            max_size=self.app.settings.max_message_size,
            names=self._names,
            task=self.name,
        )
        if idempotency_key is not None:
            key = explicit_key(self.name, idempotency_key)
            ttl = self.unique_for or self.app.settings.result_expires
        else:
            bound = self.signature.bind(*message.args, **message.kwargs)
            key = argument_key(self.name, bound.arguments)
            assert self.unique_for is not None
            ttl = self.unique_for
        return Claim(key, ttl)

    def _duplicate(self, unique: Claim, holder: str) -> TaskHandle:
        """The handle of the message that holds ``unique``; nothing is published."""
        logger.info("task.duplicate_publish", task_name=self.name, key=unique.key, task_id=holder)
        return TaskHandle(holder, self.name, app=self.app, duplicate=True)

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """Return a signature of this task: a call to send later, alone or in a workflow.

        In a :func:`~mqtasks.canvas.chain`, the previous step's result is
        prepended to ``args``; use :meth:`si` for a step that ignores it.
        """
        from .canvas import Signature

        refuse_in_workflow(self)
        return Signature(self, args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """Return an immutable signature: in a chain, it ignores the previous step's result."""
        from .canvas import Signature

        refuse_in_workflow(self)
        return Signature(self, args, kwargs, immutable=True)

    def map(self, items: Iterable[Any], **options: Any) -> list[TaskHandle]:
        """Send one call per item, each item the single argument; confirms are pipelined.

        Args:
            items: The argument of each call.
            options: As for :meth:`apply_async` (``queue``, ``priority``, ``expires``, ...).

        Raises:
            TypeError: An item does not fit the function's signature (nothing sent);
                or ``idempotency_key`` is given (keys are per call).
            ConfigurationError: The task has ``unique_for``: send each call with
                :meth:`apply_async` (inside ``with app.publishing():`` to pipeline
                the confirms), which claims its key.
            EncodeError: An item cannot be sent as JSON (nothing sent).
            BulkPublishError: Some calls were not enqueued.
        """
        return self.starmap(((item,) for item in items), **options)

    def starmap(self, items: Iterable[Sequence[Any]], **options: Any) -> list[TaskHandle]:
        """Send one call per item, each item a tuple of positional arguments.

        See :meth:`map`.
        """
        refuse_in_workflow(self)
        if "task_id" in options:
            raise TypeError("starmap() gives every call its own id; task_id is not accepted")
        if "idempotency_key" in options:
            raise TypeError(
                "map() and starmap() take no idempotency_key (one key would cover every "
                "call): call apply_async(..., idempotency_key=...) per item, inside "
                "`with app.publishing():` to pipeline the confirms."
            )
        if self.unique_for is not None:
            raise ConfigurationError(
                f"Task {self.name!r} has unique_for, and map() and starmap() publish without "
                "claiming each call's key: call apply_async() per item, inside "
                "`with app.publishing():` to pipeline the confirms."
            )
        messages = [self.message(tuple(args), None, **options) for args in items]
        return self.app.send_many(messages)

    def message(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        headers: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        expires: Seconds | datetime | None = None,
    ) -> Message:
        """Build the :class:`~mqtasks.message.Message` for a call without sending it.

        Raises:
            TypeError: The arguments do not fit the function's signature.
        """
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        try:
            self.check_arguments(args, kwargs)
        except TypeError as exc:
            raise TypeError(f"Task {self.name!r} called with wrong arguments: {exc}") from None
        if priority is None:
            priority = self.priority
        if priority is not None and not 0 <= priority <= 255:
            raise ValueError(f"priority must be 0 to 255, not {priority!r}")
        if headers:
            bad = [k for k in headers if str(k).startswith("mqtasks-")]
            if bad:
                raise ValueError(f"headers starting with 'mqtasks-' are reserved: {bad}")
        return Message(
            id=task_id or str(uuid.uuid4()),
            task=self.name,
            queue=queue or self.queue,
            args=args,
            kwargs=kwargs,
            expires_at=_expires_at(expires if expires is not None else self.expires),
            priority=priority,
            headers=dict(headers) if headers else {},
        )
