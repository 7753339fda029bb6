"""Events: publish/subscribe with topic routing, on top of tasks.

``app.emit("order.created", payload)`` publishes one message to the topic
exchange :attr:`Settings.events_exchange <mqtasks.config.Settings.events_exchange>`;
the broker copies it into every queue bound with a matching pattern. Each
subscriber (``@app.on("order.*")``) is a :class:`~mqtasks.task.Task` with a
queue of its own, so retries, dead letters, middleware, traces, metrics and
logs apply to it unchanged. A worker runs an event with the subscriber of the
queue it came from, not by its name: this module holds the registry
(:class:`Subscriptions`), the registration behind ``@app.on`` (:func:`subscribe`),
the declaration of the bindings (:func:`declare_events`), the emit path
(:func:`emit`) and the handle it returns.
"""

from __future__ import annotations

import functools
import inspect
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from .exceptions import ConfigurationError, PublishError, TransportError
from .message import MAX_NAME_LENGTH, Message, current_message
from .transport.stream import StartAt
from .transport.topic import check_key, check_pattern

if TYPE_CHECKING:
    from .app import App
    from .task import P, R, Task
    from .transport.envelope import Envelope
    from .types import Seconds

__all__ = [
    "HEADER_EVENT",
    "EventHandle",
    "Subscription",
    "Subscriptions",
    "build_message",
    "check_binding_pattern",
    "check_event_name",
    "check_subscriber",
    "current_event",
    "declare_events",
    "declare_own_events",
    "emit",
    "event_of",
    "publish_event",
    "same_function",
    "stale_bindings",
    "subscribe",
    "warn_stale_bindings",
    "wire_message",
]

logger = structlog.get_logger("mqtasks.events")

#: Header: the name (routing key) of the event a message carries; a message with
#: it is run by the subscriber of the queue it arrives on.
HEADER_EVENT = "mqtasks-event"


@dataclass(frozen=True)
class Subscription:
    """One subscriber: its binding pattern, its queue and the task that runs it."""

    #: The binding pattern (``order.*``, ``order.#``, ``order.created``).
    pattern: str
    #: The queue bound with ``pattern``; the subscriber's task consumes it.
    queue: str
    #: The task that runs each event arriving on ``queue``.
    task: Task[Any, Any] = field(compare=False)
    #: The stream it reads (``mqtasks.streams``), its group being ``queue``; None:
    #: the queue is bound to the events exchange.
    stream: str | None = None
    #: Where its group starts when first created (stream subscribers only).
    start: StartAt = field(default="last", compare=False)

    def __iter__(self) -> Iterator[Any]:
        # (pattern, queue, task) unpacks as the tuple it stands for.
        return iter((self.pattern, self.queue, self.task))


class Subscriptions:
    """The subscribers of an app, one per queue.

    Iterating gives :class:`Subscription` objects in registration order.
    """

    def __init__(self) -> None:
        self._by_queue: dict[str, Subscription] = {}

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self._by_queue.values()))

    def __len__(self) -> int:
        return len(self._by_queue)

    def __repr__(self) -> str:
        return f"<Subscriptions {[(s.pattern, s.queue) for s in self]}>"

    def for_queue(self, queue: str) -> Subscription | None:
        """Return the subscriber of ``queue``, or None."""
        return self._by_queue.get(queue)

    def queues(self) -> list[str]:
        """Return the subscriber queues, in registration order."""
        return list(self._by_queue)

    def check_free(self, queue: str, fn: Callable[..., Any]) -> None:
        """Refuse a second subscriber on ``queue``.

        Raises:
            ConfigurationError: ``queue`` has a subscriber already (both are named).
        """
        existing = self._by_queue.get(queue)
        if existing is not None:
            raise ConfigurationError(
                f"Queue {queue!r} already has a subscriber, {existing.task.name!r} "
                f"(pattern {existing.pattern!r}); {_qualname(fn)!r} cannot subscribe on it too. "
                "A queue has one subscriber: pass queue=... to one of them (two queues get "
                "every event each), or run more workers on one queue to share its events."
            )

    def add(self, subscription: Subscription) -> None:
        """Register ``subscription`` (after :meth:`check_free`)."""
        self._by_queue[subscription.queue] = subscription


def _qualname(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", repr(fn))
    return f"{module}.{name}" if module else name


def check_subscriber(fn: Callable[..., Any], pattern: str) -> None:
    """Refuse a subscriber function that cannot take the event payload as its one argument.

    Raises:
        ConfigurationError: ``fn`` cannot be called with exactly one positional argument.
    """
    try:
        inspect.signature(fn).bind(None)
    except TypeError as exc:
        raise ConfigurationError(
            f"Subscriber {_qualname(fn)!r} of {pattern!r} must take one argument, the "
            f"event payload: {exc}."
        ) from None
    except ValueError:  # no signature to read (some builtins): checked when it runs
        pass


def check_binding_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a usable binding pattern.

    Raises:
        ConfigurationError: It is not (the message says why and what would be).
    """
    try:
        return check_pattern(pattern)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def check_event_name(name: str) -> str:
    """Return ``name`` if an event can be emitted under it.

    An event name is a routing key of words separated by dots (``order.created``),
    without the wildcards ``*`` and ``#`` a pattern may hold.

    Raises:
        ValueError: It is empty, has an empty word or a wildcard word, a control
            character, or is longer than 255 bytes.
    """
    if not isinstance(name, str):
        check_key(name)  # says what is wrong
    return _check_event_name(name)


# Checked on every emit(); an app emits few distinct names, so a name found good once is
# not scanned again (a bad one raises and is not remembered).
@functools.lru_cache(maxsize=1024)
def _check_event_name(name: str) -> str:
    check_key(name)
    if not name or len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"Event name {name!r} must be 1 to {MAX_NAME_LENGTH} characters, words "
            "separated by '.', such as 'order.created'."
        )
    words = name.split(".")
    if any(not w for w in words):
        raise ValueError(
            f"Event name {name!r} has an empty word (a leading, trailing or doubled '.'); "
            "words are separated by single dots, such as 'order.created'."
        )
    if any(w in ("*", "#") for w in words):
        raise ValueError(
            f"Event name {name!r} has a wildcard word: '*' and '#' belong in the patterns "
            "of @app.on(...), an event names what happened, such as 'order.created'."
        )
    return name


@dataclass(frozen=True)
class EventHandle:
    """What :meth:`App.emit() <mqtasks.app.App.emit>` returns: the event's id, once the broker
    has confirmed it.

    An event has no result of its own: each subscriber runs it as a task of
    its own queue, and subscribers store no results (they are registered with
    ``ignore_result=True``), so :meth:`get` raises. To wait for the work an
    event starts, have the subscriber send a task (``task.delay()``) and wait
    for that task's result.
    """

    #: The message id: the same in every subscriber queue, and across retries.
    id: str
    #: The event name (the routing key).
    event: str
    #: The exchange it was published to.
    exchange: str
    #: How many queues the broker copied it into; None when the broker does not say
    #: (RabbitMQ: confirmed as routed, without a count).
    routed: int | None = None

    def __str__(self) -> str:
        return self.id

    def get(self, timeout: float | None = None, **_: Any) -> Any:
        """Refuse: an event has no single result.

        Raises:
            ConfigurationError: Always; the message says what to do instead.
        """
        raise ConfigurationError(
            f"Event {self.event!r} ({self.id}) has no result to get: every subscriber "
            "runs it as a task of its own queue, and subscribers store no result. To wait "
            "for work an event starts, have its subscriber send a task and wait for that."
        )


def stale_bindings(app: App, subscriptions: Iterable[Subscription]) -> list[tuple[str, str]]:
    """Return the bindings of the events exchange on these subscribers' queues that none of
    them declares: patterns left by an earlier version of a subscriber, which still route
    events to its queue.

    Only what :meth:`Transport.bindings() <mqtasks.transport.base.Transport.bindings>`
    lists is seen: every binding on ``redis://`` and ``memory://``; on RabbitMQ, which
    cannot list bindings over AMQP, only those this process made (so none is reported).

    Raises:
        ConfigurationError: The transport cannot route events.
        ConnectionFailed: The broker cannot be reached.
    """
    subs = list(subscriptions)
    queues = {s.queue for s in subs}
    wanted = {(s.pattern, s.queue) for s in subs}
    bound = app.transport.bindings(app.settings.events_exchange)
    return [(p, q) for p, q in bound if q in queues and (p, q) not in wanted]


def warn_stale_bindings(app: App, subscriptions: Sequence[Subscription]) -> None:
    """Log ``events.stale_binding`` for each of :func:`stale_bindings`' (a worker's start-up
    check: their events run all the same); never raises."""
    if not subscriptions:
        return
    try:
        stale = stale_bindings(app, subscriptions)
    except Exception as exc:  # a check must never stop a worker
        logger.warning("events.bindings_unchecked", error=type(exc).__name__)
        return
    for pattern, name in stale:
        subscription = app.subscriptions.for_queue(name)
        logger.warning(
            "events.stale_binding",
            pattern=pattern,
            queue=name,
            subscriber=subscription.task.name if subscription else None,
            note="its events reach the queue and run; unbind it if it is no longer wanted",
        )


def event_of(headers: Mapping[str, Any]) -> str | None:
    """Return the event name ``headers`` carry, or None for a task message."""
    value = headers.get(HEADER_EVENT)
    return value if isinstance(value, str) else None


def current_event() -> str | None:
    """Return the name of the event the running subscriber handles, or None outside one.

    A subscriber of ``order.*`` tells ``order.created`` from ``order.paid`` this way::

        @app.on("order.*")
        def audit(payload: dict) -> None:
            log.info("order event", name=current_event(), **payload)
    """
    message = current_message()
    return event_of(message.headers) if message is not None else None


def wire_message(message: Message) -> Message:
    """Return ``message`` as it travels: an event's task header is its event name.

    A worker runs an event with ``message.task`` set to its subscriber's task
    name (so that the subscriber's retry policy and options apply); what it
    publishes again (a retry, a deferral) names the event, as the first publish did.
    """
    event = event_of(message.headers)
    return message if event is None or message.task == event else message.copy(task=event)


def build_message(
    exchange: str,
    event: str,
    payload: Any,
    *,
    headers: Mapping[str, Any] | None,
    event_id: str | None,
) -> Message:
    """Build the message of an event: body ``{"args": [payload], "kwargs": {}}``.

    Raises:
        ValueError: A bad event name, or a reserved (``mqtasks-``) header.
    """
    check_event_name(event)
    if headers:
        bad = [k for k in headers if str(k).startswith("mqtasks-")]
        if bad:
            raise ValueError(f"headers starting with 'mqtasks-' are reserved: {bad}")
    extra = dict(headers) if headers else {}
    extra[HEADER_EVENT] = event
    return Message(
        id=event_id or str(uuid.uuid4()),
        task=event,
        queue=exchange,
        args=(payload,),
        kwargs={},
        headers=extra,
    )


def emit(
    app: App,
    event: str,
    payload: Any,
    *,
    mandatory: bool = True,
    headers: Mapping[str, Any] | None = None,
    event_id: str | None = None,
) -> EventHandle:
    """Publish event ``event`` with ``payload`` to the app's events exchange, confirmed.

    The publish middleware runs as for ``delay()`` (``before_publish``, then
    ``after_publish`` or ``after_publish_error``); the message's ``queue`` is the
    exchange's name.

    Raises:
        ValueError: A bad event name or a reserved header.
        EncodeError: A payload JSON cannot carry, or over ``max_message_size``.
        Unroutable: ``mandatory`` and no queue is bound for ``event``.
        PublishError: The broker did not take the event.
        ConfigurationError: The transport cannot route events.
    """
    exchange = app.settings.events_exchange
    message = build_message(exchange, event, payload, headers=headers, event_id=event_id)

    def send(envelope: Envelope) -> int:
        declare_own_events(app)
        return app.transport.emit(exchange, event, envelope, mandatory=mandatory)

    message, routed = publish_event(app, message, send, f"published to {exchange!r}")
    return EventHandle(message.id, event, exchange, routed if routed >= 0 else None)


def publish_event(
    app: App, message: Message, send: Callable[[Envelope], Any], where: str
) -> tuple[Message, Any]:
    """Run the publish middleware around ``send(envelope)`` of an event's ``message``.

    Returns:
        The message as the hooks left it, and what ``send`` returned.

    Raises:
        PublishError: ``send`` raised a TransportError (the message says ``where``).
    """
    event = event_of(message.headers) or message.task
    hooks = app._hooks
    message = hooks.before_publish(app, message)
    if event_of(message.headers) != event:  # a hook replaced the headers
        message = message.copy(headers={**message.headers, HEADER_EVENT: event})
    try:
        envelope = message.encode(max_size=app.settings.max_message_size)
        try:
            result = send(envelope)
        except (PublishError, ConfigurationError):
            raise
        except TransportError as exc:
            raise PublishError(
                f"Event {event!r} ({message.id}) was NOT {where}: {exc}", task_id=message.id
            ) from exc
    except BaseException as exc:
        hooks.after_publish_error(app, [message], exc)
        raise
    hooks.after_publish(app, [message])
    return message, result


# -- App's subscribers (App.on, App.declare_events delegate here) ---------------------


def subscribe(
    app: App,
    pattern: str,
    *,
    queue: str | None,
    name: str | None,
    priority: int | None,
    expires: Seconds | None,
    task_options: dict[str, Any],
    stream: str | None = None,
    start: StartAt = "last",
) -> Callable[[Callable[P, R]], Task[P, R]]:
    """Return the decorator registering a function as ``app``'s subscriber of ``pattern``
    (of stream ``stream``'s entries, when given); see :meth:`App.on <mqtasks.app.App.on>`.

    Raises:
        ConfigurationError: A bad pattern, a function that cannot take one
            argument, a queue with another subscriber already (both named),
            ``ignore_result=False``, ``idempotent``, ``unique_for`` or ``broadcast``, or an
            option no middleware understands.
        DuplicateTask: Another function is registered under the same task name.
    """
    check_binding_pattern(pattern)
    if task_options.get("ignore_result", True) is not True:
        raise ConfigurationError(
            f"Subscribers of {pattern!r} store no result (ignore_result=True): an event "
            "has one outcome per subscriber, all under the event's id."
        )
    task_options["ignore_result"] = True
    if task_options.get("ordering_key") is not None:
        raise ConfigurationError(
            f"Subscribers of {pattern!r} cannot take ordering_key: events are emitted to "
            "every subscriber queue at once, not through a key's partition. Have the "
            "subscriber call an ordered task (@app.task(ordering_key=...)) instead."
        )
    if task_options.get("broadcast"):
        raise ConfigurationError(
            f"Subscribers of {pattern!r} cannot take broadcast: a subscriber group's "
            "workers share its events. For every worker to act on an event, have the "
            "subscriber call a broadcast task (@app.task(broadcast=True)) instead."
        )
    for option in ("idempotent", "unique_for"):
        if task_options.get(option):
            raise ConfigurationError(
                f"Subscribers of {pattern!r} cannot be {option}: every subscriber of an "
                "event gets it under the event's id, so keys of that id alone would let "
                "one subscriber's run stand for the others'. Make the subscriber itself "
                "idempotent (current_message().id is stable across its retries)."
            )

    def register(fn: Callable[P, R]) -> Task[P, R]:
        check_subscriber(fn, pattern)
        sub_queue = queue or f"{app.name}.{getattr(fn, '__name__', 'subscriber')}"
        existing = app.subscriptions.for_queue(sub_queue)
        if (
            existing is not None
            and existing.pattern == pattern
            and existing.stream == stream
            and (existing.task.fn is fn or same_function(existing.task.fn, fn))
        ):
            return existing.task  # type: ignore[return-value]  # module imported twice
        app.subscriptions.check_free(sub_queue, fn)
        task: Task[P, R] = app.task(
            name=name, queue=sub_queue, priority=priority, expires=expires, **task_options
        )(fn)
        app.subscriptions.add(Subscription(pattern, sub_queue, task, stream, start))
        return task

    return register


def same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """Whether ``a`` and ``b`` are one function defined twice, by a module imported twice
    (``__main__`` and its import name): the same file and first line."""
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (
        code_a is not None
        and code_b is not None
        and code_a.co_filename == code_b.co_filename
        and code_a.co_firstlineno == code_b.co_firstlineno
    )


def declare_events(app: App, queues: Sequence[str] | None = None) -> list[Subscription]:
    """Declare the events exchange, and the queue and binding of each subscriber of ``app``;
    see :meth:`App.declare_events <mqtasks.app.App.declare_events>`.

    Raises:
        ConfigurationError: The transport cannot route events.
        ConnectionFailed: The broker cannot be reached.
        TransportError: The broker refused a declaration.
    """
    wanted = None if queues is None else set(queues)
    chosen = [s for s in app.subscriptions if wanted is None or s.queue in wanted]
    exchange = app.settings.events_exchange
    for sub in chosen:
        if sub.stream is None:  # a stream subscriber's queue is fed by its pump, not bound
            app.transport.bind(exchange, sub.pattern, app.queue(sub.queue))
        app._bound.add(sub)
    return [s for s in chosen if s.stream is None]


def declare_own_events(app: App) -> None:
    """Declare the bindings of ``app``'s subscribers not declared yet (by ``app``)."""
    if len(app._bound) < len(app.subscriptions):
        pending = [s.queue for s in app.subscriptions if s not in app._bound]
        app.declare_events(pending)
