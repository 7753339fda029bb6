"""StructlogContext: the task context on every log event, and the task lifecycle events.

For each message a worker runs, the middleware binds ``task_id``,
``task_name``, ``attempt``, ``queue`` and, when the message carries a W3C
``traceparent`` header, ``trace_id`` with :mod:`structlog.contextvars`. Every
event logged while the task runs gets them, the task's own
``structlog.get_logger().info(...)`` calls included, as long as the structlog
configuration has :func:`~structlog.contextvars.merge_contextvars` (structlog's
default does, and so does :func:`mqtasks.logging.configure_logging`).

It also logs the lifecycle events the worker does not log itself, with the
same names as the StatsD metrics: ``task.published``, ``task.received`` and
``task.succeeded`` at debug level (one line per task would be most of a busy
worker's log, and of its logging cost; the StatsD counters count them) and only
once structlog is configured (its default configuration prints every level, so
an application that never configured it would get a line per ``delay()``), and
``task.publish_failed`` at warning level. The worker logs ``task.failed``,
``task.retried``, ``task.rejected``, ``message.rejected`` and
``task.dead_lettered`` (info level and above) whatever middleware is installed.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog

from .base import Middleware

if TYPE_CHECKING:
    from ..app import App
    from ..config import Settings
    from ..message import Message
    from ..worker import Worker

__all__ = ["StructlogContext", "trace_id_of"]

logger = structlog.get_logger("mqtasks.worker")
publish_logger = structlog.get_logger("mqtasks.app")


def trace_id_of(headers: Mapping[str, Any]) -> str | None:
    """Return the trace id of a W3C ``traceparent`` header in ``headers``, if any.

    ``traceparent`` is ``version-traceid-spanid-flags``, for example
    ``00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01``.
    """
    value = headers.get("traceparent")
    if type(value) is str and len(value) >= 55 and value[2] == "-" and value[35] == "-":
        return value[3:35]
    return None


class StructlogContext(Middleware):
    """Binds the task context to structlog's contextvars per message; logs lifecycle events.

    Args:
        log_args: Add the task's ``args`` and ``kwargs`` to ``task.received``
            (off by default: arguments may hold personal data or secrets).
    """

    def __init__(self, *, log_args: bool = False) -> None:
        self.log_args = log_args
        self._local = threading.local()

    @classmethod
    def from_settings(cls, settings: Settings) -> StructlogContext:
        """Return the instance for the settings' ``log_task_args``."""
        return cls(log_args=settings.log_task_args)

    def __repr__(self) -> str:
        return f"<StructlogContext log_args={self.log_args}>"

    def after_publish(self, app: App, message: Message) -> None:
        """Log ``task.published`` (debug)."""
        if not structlog.is_configured():
            return  # structlog's default prints every level: not a line per delay()
        publish_logger.debug(
            "task.published",
            task_id=message.id,
            task_name=message.task,
            attempt=message.attempt,
            queue=message.queue,
            trace_id=trace_id_of(message.headers),
        )

    def after_publish_error(self, app: App, message: Message, exception: BaseException) -> None:
        """Log ``task.publish_failed`` (warning); the caller gets the exception."""
        publish_logger.warning(
            "task.publish_failed",
            task_id=message.id,
            task_name=message.task,
            attempt=message.attempt,
            queue=message.queue,
            trace_id=trace_id_of(message.headers),
            error=f"{type(exception).__name__}: {exception}"[:500],
        )

    def before_process(self, worker: Worker, message: Message) -> None:
        """Bind the task context and log ``task.received`` (debug)."""
        context: dict[str, Any] = {
            "task_id": message.id,
            "task_name": message.task,
            "attempt": message.attempt,
            "queue": message.queue,
        }
        trace_id = trace_id_of(message.headers)
        if trace_id is not None:
            context["trace_id"] = trace_id
        local = self._local
        local.tokens = [_context_var(key).set(value) for key, value in context.items()]
        local.context = context
        local.started = time.perf_counter()
        # The context goes in explicitly too: the events keep it under a
        # structlog configuration without merge_contextvars.
        if not structlog.is_configured():
            pass  # structlog's default prints every level: no debug line per task
        elif self.log_args:
            logger.debug(
                "task.received",
                redelivered=message.redelivered,
                args=list(message.args),
                kwargs=dict(message.kwargs),
                **context,
            )
        else:
            logger.debug("task.received", redelivered=message.redelivered, **context)

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Log ``task.succeeded`` (debug, with the run time in seconds), then unbind."""
        local = self._local
        tokens = getattr(local, "tokens", None)
        if tokens is None:  # before_process did not run for this message
            return
        if exception is None:
            duration = round(time.perf_counter() - local.started, 6)
            if structlog.is_configured():
                logger.debug("task.succeeded", duration=duration, **local.context)
        local.tokens = None
        for token in reversed(tokens):
            token.var.reset(token)


#: The ContextVar behind each context key, as structlog.contextvars names and keeps them.
_CONTEXT_VARS: dict[str, contextvars.ContextVar[Any]] = {}


def _context_var(key: str) -> contextvars.ContextVar[Any]:
    """Return the ContextVar that :func:`structlog.contextvars.bind_contextvars` uses for ``key``.

    bind_contextvars() builds the variable's name and looks it up for every key of
    every call; a worker binds five keys per task, so the variables are looked up
    once, through the token structlog returns, and set directly.
    """
    var = _CONTEXT_VARS.get(key)
    if var is None:
        token = structlog.contextvars.bind_contextvars(**{key: None})[key]
        var = _CONTEXT_VARS[key] = token.var
        var.reset(token)
    return var
