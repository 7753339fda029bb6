"""Middleware: hooks around publishing and processing, for observability and policy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..app import App
    from ..config import Settings
    from ..message import Message
    from ..worker import Worker

__all__ = ["Middleware", "overriding"]


class Middleware:
    """Base class: every hook is a no-op; override the ones you need.

    ``before_*`` hooks run in installation order and ``after_*`` hooks in
    reverse. An exception in a hook is logged and never fails the task, except
    :class:`~mqtasks.exceptions.SkipMessage` raised from :meth:`before_process`,
    which acknowledges the message without running it.

    The worker calls only the hooks a middleware overrides, so an unused hook
    costs nothing. For one message, the worker calls, in this order:
    :meth:`before_process`; the task; then, depending on the outcome,
    :meth:`after_retry`, :meth:`after_reject` and :meth:`after_dead_letter`;
    and last :meth:`after_process`. All of them run in the worker thread
    that runs the task, so per-message state can live in a
    :class:`threading.local`. A message refused as bad input never reaches
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
