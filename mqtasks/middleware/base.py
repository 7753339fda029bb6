"""Middleware: hooks around publishing and processing, for observability and policy,
and the runner that calls them in order."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from ..exceptions import MiddlewareError, SkipMessage

if TYPE_CHECKING:
    from ..app import App
    from ..config import Settings
    from ..message import Message
    from ..worker import Worker

__all__ = ["DeferBackoff", "Middleware", "Runner", "call_hook", "ensure", "overriding"]

logger = structlog.get_logger("mqtasks.middleware")


class Middleware:
    """Base class: every hook is a no-op; override the ones you need.

    ``before_*`` hooks run in installation order and ``after_*`` hooks in
    reverse. An exception in a hook is logged and never fails the task, except
    :class:`~mqtasks.exceptions.SkipMessage` raised from :meth:`before_process`,
    which acknowledges the message without running it.

    The worker calls only the hooks a middleware overrides, so an unused hook
    costs nothing. For one message, the worker calls, in this order:
    :meth:`before_process`; the task; then, depending on the outcome,
    :meth:`after_reject`, :meth:`after_retry` and :meth:`after_dead_letter`;
    and last :meth:`after_process`. The retry or dead letter is the decision
    of :class:`~mqtasks.middleware.retries.Retries`, which every worker puts
    last in its stack, so its ``after_process`` runs before the others'. All of them run in the worker thread
    that runs the task, so per-message state can live in a
    :class:`threading.local`. For a batch task one thread runs the hooks of
    every message of the batch: the worker keeps each message's state in the
    middleware's own ``threading.local`` attributes apart (saved after its
    :meth:`before_process`, put back before its :meth:`after_process`); state in
    context variables is per message anyway. A message refused as bad input never reaches
    :meth:`before_process`: only :meth:`after_reject` and
    :meth:`after_dead_letter` are called for it.
    """

    #: Task options this middleware understands (checked at ``@app.task`` time).
    task_options: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> Middleware | None:
        """Return the instance the default stack installs for ``settings``, or None.

        :func:`~mqtasks.middleware.default_middleware` calls this for each class
        of :data:`~mqtasks.middleware.DEFAULT_MIDDLEWARE`; None leaves the
        middleware out (for example StatsD metrics without a ``statsd_url``).
        """
        return cls()

    def before_publish(self, app: App, message: Message) -> Message:
        """Called before a message is published; may return a changed message."""
        return message

    def after_publish(self, app: App, message: Message) -> None:
        """Called after the broker has confirmed a message."""

    def after_publish_error(self, app: App, message: Message, exception: BaseException) -> None:
        """Called when a message that went through :meth:`before_publish` was not published.

        ``exception`` is what the caller of ``delay()`` (or ``send_many()``) gets:
        an :exc:`~mqtasks.exceptions.EncodeError` or a
        :exc:`~mqtasks.exceptions.PublishError`.
        """

    def worker_boot(self, worker: Worker) -> None:
        """Called once when a worker starts, before it consumes."""

    def worker_shutdown(self, worker: Worker) -> None:
        """Called once when a worker has stopped."""

    def before_process(self, worker: Worker, message: Message) -> None:
        """Called in the worker thread before the task runs.

        ``message.redelivered`` tells whether the broker delivered this message
        before (to a worker that did not acknowledge it).
        """

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Called last for a message :meth:`before_process` saw, before the ack.

        ``exception`` is set if the task raised (including
        :exc:`~mqtasks.exceptions.Retry` and :exc:`~mqtasks.exceptions.Reject`),
        or is the :exc:`~mqtasks.exceptions.SkipMessage` a later middleware
        raised in :meth:`before_process`; otherwise ``result`` is what the task
        returned. A retry or dead-letter publish, if any, has happened already.
        """

    def after_retry(
        self, worker: Worker, message: Message, delay: float, exception: BaseException
    ) -> None:
        """Called once the next attempt of ``message`` is published, due in ``delay`` seconds.

        ``exception`` made this attempt fail (an
        :exc:`~mqtasks.exceptions.Retry` when the task asked for it).
        """

    def after_reject(self, worker: Worker, message: Message | None, reason: str) -> None:
        """Called when a message is rejected: bad input, or the task raised Reject.

        ``message`` is None if the delivery could not be decoded; ``reason`` is
        the reason code (``"rejected"`` for :exc:`~mqtasks.exceptions.Reject`).
        """

    def after_dead_letter(self, worker: Worker, message: Message | None, reason: str) -> None:
        """Called once a message is stored in its dead-letter queue with ``reason``.

        ``message`` is None if the delivery could not be decoded.
        """


def overriding(middleware: Sequence[Middleware], hook: str) -> list[Callable[..., Any]]:
    """Return the bound ``hook`` methods of the middleware that override it, in order.

    The worker calls these lists, so a hook no installed middleware overrides
    costs nothing per message.
    """
    base = getattr(Middleware, hook)
    return [
        getattr(mw, hook)
        for mw in middleware
        if getattr(type(mw), hook, base) is not base or hook in getattr(mw, "__dict__", ())
    ]


def call_hook(hook: Callable[..., Any], *args: Any, default: Any = None, **kwargs: Any) -> Any:
    """Run a middleware hook; log its error instead of raising it.

    A :exc:`~mqtasks.exceptions.MiddlewareError` (a veto, such as
    :exc:`~mqtasks.exceptions.SkipMessage`) is raised; any other error is logged
    as ``middleware.hook_failed`` and ``default`` returned, so an observability
    bug never fails a task or a publish.

    Returns:
        What the hook returned, or ``default`` if it failed or returned None.
    """
    try:
        result = hook(*args, **kwargs)
    except MiddlewareError:
        raise
    except Exception:
        logger.exception("middleware.hook_failed", hook=getattr(hook, "__qualname__", repr(hook)))
        return default
    return default if result is None and default is not None else result


def ensure(middleware: Sequence[Middleware], cls: type[Middleware]) -> list[Middleware]:
    """Return ``middleware`` with a new ``cls()`` at the end, unless it has a ``cls`` already.

    The stack is copied: ``middleware`` itself is never changed.
    """
    stack = list(middleware)
    if not any(isinstance(mw, cls) for mw in stack):
        stack.append(cls())
    return stack


class DeferBackoff:
    """The hold of a message deferred after a backend failure, for a middleware.

    Each failure in a row doubles the hold, from ``defer_delay`` up to
    ``max_defer_delay``, times a jitter in [0.75, 1.0] that spreads the
    deferred copies' returns; :meth:`reset` (on a success) starts it over.
    Thread-safe: one instance serves every worker thread.

    Args:
        defer_delay: The first hold, in seconds.
        max_defer_delay: The longest hold, in seconds.

    Raises:
        ValueError: ``defer_delay`` is not positive or exceeds ``max_defer_delay``.
    """

    def __init__(self, defer_delay: float, max_defer_delay: float) -> None:
        if defer_delay <= 0 or max_defer_delay < defer_delay:
            raise ValueError("defer_delay must be positive and at most max_defer_delay")
        self.defer_delay = defer_delay
        self.max_defer_delay = max_defer_delay
        self._failures = 0
        self._lock = threading.Lock()

    def next_delay(self) -> float:
        """Count one more failure in a row and return the hold it calls for, in seconds."""
        with self._lock:
            failures = self._failures = self._failures + 1
        delay = min(self.max_defer_delay, self.defer_delay * 2.0 ** min(failures - 1, 16))
        jitter: float = random.uniform(0.75, 1.0)
        return delay * jitter

    def reset(self) -> None:
        """End the run of failures: the next hold is ``defer_delay`` again."""
        if self._failures:
            with self._lock:
                self._failures = 0


class Runner:
    """Calls the hooks of a middleware stack: ``before_*`` in order, ``after_*`` in reverse.

    Args:
        middleware: The stack, in installation order. The publishing hooks read
            it at every call (an app's list may change at any time); the
            processing hooks are bound on first use, only those a middleware
            overrides, so a worker's hot path pays nothing for the rest.
    """

    def __init__(self, middleware: Sequence[Middleware]) -> None:
        self.middleware = middleware
        self._bound: dict[str, list[Callable[..., Any]]] = {}

    def __repr__(self) -> str:
        return f"<Runner {[type(m).__name__ for m in self.middleware]}>"

    def _hooks(self, name: str) -> list[Callable[..., Any]]:
        hooks = self._bound.get(name)
        if hooks is None:
            stack = self.middleware if name.startswith("before_") else self.middleware[::-1]
            hooks = self._bound[name] = overriding(stack, name)
        return hooks

    # -- publishing -------------------------------------------------------------

    def before_publish(self, app: App, message: Message) -> Message:
        """Run every ``before_publish``; return the message as the last one changed it.

        Raises:
            MiddlewareError: A middleware vetoed; those before it got
                ``after_publish_error`` with it, in reverse.
        """
        mws = self.middleware
        for i, mw in enumerate(mws):
            try:
                message = call_hook(mw.before_publish, app, message, default=message)
            except BaseException as exc:  # a MiddlewareError vetoes: close what was opened
                for opened in reversed(mws[:i]):
                    call_hook(opened.after_publish_error, app, message, exc)
                raise
        return message

    def after_publish(self, app: App, messages: Iterable[Message]) -> None:
        """Run every ``after_publish``, in reverse, for each of ``messages``."""
        mws = self.middleware[::-1]
        for message in messages:
            for mw in mws:
                call_hook(mw.after_publish, app, message)

    def after_publish_error(
        self, app: App, messages: Iterable[Message], exception: BaseException
    ) -> None:
        """Run every ``after_publish_error``, in reverse, for each of ``messages``."""
        mws = self.middleware[::-1]
        for message in messages:
            for mw in mws:
                call_hook(mw.after_publish_error, app, message, exception)

    # -- processing -------------------------------------------------------------

    def worker_boot(self, worker: Worker) -> None:
        """Run every ``worker_boot``, in order."""
        for mw in self.middleware:
            call_hook(mw.worker_boot, worker)

    def worker_shutdown(self, worker: Worker) -> None:
        """Run every ``worker_shutdown``, in reverse."""
        for mw in self.middleware[::-1]:
            call_hook(mw.worker_shutdown, worker)

    def before_process(self, worker: Worker, message: Message) -> None:
        """Run the ``before_process`` overrides, in order.

        Raises:
            SkipMessage: A middleware skipped the message; the middleware before
                it got ``after_process`` with it, in reverse (their brackets closed).
        """
        for hook in self._hooks("before_process"):
            try:
                call_hook(hook, worker, message)
            except SkipMessage as skip:
                mws = list(self.middleware)
                skipper = getattr(hook, "__self__", None)
                opened = mws[: mws.index(skipper)] if skipper in mws else []
                for mw in reversed(opened):
                    call_hook(mw.after_process, worker, message, result=None, exception=skip)
                raise

    def after_process(
        self, worker: Worker, message: Message, result: Any, exception: BaseException | None
    ) -> None:
        """Run the ``after_process`` overrides, in reverse."""
        for hook in self._hooks("after_process"):
            call_hook(hook, worker, message, result=result, exception=exception)

    def after_retry(
        self, worker: Worker, message: Message, delay: float, exception: BaseException
    ) -> None:
        """Run the ``after_retry`` overrides, in reverse."""
        for hook in self._hooks("after_retry"):
            call_hook(hook, worker, message, delay, exception)

    def after_reject(self, worker: Worker, message: Message | None, reason: str) -> None:
        """Run the ``after_reject`` overrides, in reverse."""
        for hook in self._hooks("after_reject"):
            call_hook(hook, worker, message, reason)

    def after_dead_letter(self, worker: Worker, message: Message | None, reason: str) -> None:
        """Run the ``after_dead_letter`` overrides, in reverse."""
        for hook in self._hooks("after_dead_letter"):
            call_hook(hook, worker, message, reason)
