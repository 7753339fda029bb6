"""The outbox: a task published inside the caller's own database transaction.

``apply_async(..., connection=conn)`` hands the message to a transport that can
write it in that transaction (today the ``postgresql://`` broker's
``publish_in_transaction``), so it exists only if the caller commits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .exceptions import ConfigurationError, PublishError, TransportError
from .handle import TaskHandle
from .message import Message
from .ordering.publish import route

if TYPE_CHECKING:
    from .task import Task

__all__ = ["send_in_transaction"]


def send_in_transaction(
    task: Task[Any, Any],
    message: Message,
    delay: float | None,
    idempotency_key: str | None,
    connection: Any,
) -> TaskHandle:
    """Insert ``message`` in ``connection``'s transaction (``apply_async(connection=)``),
    the publish middleware running as for ``delay()``.

    Raises:
        ConfigurationError: The broker cannot publish in a transaction, or the
            task claims something (broadcast, uniqueness) that a rollback
            would leave behind.
        PublishError: The queue could not be declared.
    """

    app = task.app
    publish_in = getattr(app.transport, "publish_in_transaction", None)
    if publish_in is None:  # no capability says it: the method does
        raise ConfigurationError(
            "connection= publishes in your database transaction, which needs the "
            f"postgresql:// broker; {app.transport.schemes[0]}:// keeps its messages "
            "elsewhere. Publish after the commit, or use App(broker='postgresql://...')."
        )
    if task.broadcast or idempotency_key is not None or task.unique_for is not None:
        raise ConfigurationError(
            f"Task {task.name!r}: connection= cannot go with a broadcast task, "
            "idempotency_key or unique_for: a claim made outside your transaction would "
            "outlive its rollback. Publish it after the commit instead."
        )
    message, envelope = app._prepare(route(app, message, delay), task._names)
    try:
        try:
            app.transport.declare([app.queue(message.queue)])
        except TransportError as exc:
            raise PublishError(
                f"Task {message.id} was NOT enqueued on {message.queue!r}: {exc}",
                task_id=message.id,
            ) from exc
        publish_in(connection, message.queue, envelope, delay=delay)
    except BaseException as exc:
        app._hooks.after_publish_error(app, [message], exc)
        raise
    app._hooks.after_publish(app, [message])
    return TaskHandle(message.id, message.task, message.queue, app=app)
