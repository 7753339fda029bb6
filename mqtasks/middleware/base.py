"""Middleware: hooks around publishing and processing, for observability and policy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..app import App
    from ..message import Message
    from ..worker import Worker

__all__ = ["Middleware"]


class Middleware:
    """Base class: every hook is a no-op; override the ones you need.

    ``before_*`` hooks run in installation order and ``after_*`` hooks in
    reverse. An exception in a hook is logged and never fails the task, except
    :class:`~mqtasks.exceptions.SkipMessage` raised from :meth:`before_process`,
    which acknowledges the message without running it.
    """

    #: Task options this middleware understands (checked at ``@app.task`` time).
    task_options: ClassVar[frozenset[str]] = frozenset()

    def before_publish(self, app: App, message: Message) -> Message:
        """Called before a message is published; may return a changed message."""
        return message

    def after_publish(self, app: App, message: Message) -> None:
        """Called after the broker has confirmed a message."""

    def worker_boot(self, worker: Worker) -> None:
        """Called once when a worker starts, before it consumes."""

    def worker_shutdown(self, worker: Worker) -> None:
        """Called once when a worker has stopped."""

    def before_process(self, worker: Worker, message: Message) -> None:
        """Called in the worker thread before the task runs."""

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Called after the task ran (``exception`` set if it raised), before the ack."""

    def after_reject(self, worker: Worker, message: Message | None, reason: str) -> None:
        """Called when a message is rejected as bad input (``message`` is None if undecodable)."""
