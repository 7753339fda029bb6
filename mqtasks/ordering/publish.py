"""The publish step of ordered tasks: the key's partition queue and its next sequence number.

:func:`route` runs on every publish path (``delay``, ``apply_async``,
``send_many``, workflow steps) before the message is encoded: a message of a
task with ``ordering_key`` goes to its key's partition queue with the headers
``mqtasks-okey`` (the key's digest) and ``mqtasks-oseq`` (the number the
backend's counter of the key gave it). :func:`reroute` sends a message of an
ordered task that arrived on its base queue (a replayed dead letter, an old
client) through its partition with a fresh number.

On a queue whose broker keeps each key's order itself (an SQS FIFO queue:
``Capabilities.native_ordering``), a message stays on the task's queue with
only ``mqtasks-okey``, which the broker takes as its group; no number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from ..exceptions import ConfigurationError
from .keys import HEADER_OKEY, HEADER_OSEQ, sequence_key

if TYPE_CHECKING:
    from ..app import App
    from ..message import Message
    from ..task import Task
    from ..transport.base import Delivery

__all__ = ["is_ordered", "reroute", "route"]

logger = structlog.get_logger("mqtasks.ordering")


def is_ordered(app: App, message: Message) -> bool:
    """Whether ``message`` is a call of an ordered task not yet routed to its partition."""
    task = app.tasks.get(message.task)
    return getattr(task, "ordering", None) is not None and HEADER_OKEY not in message.headers


def route(app: App, message: Message, delay: float | None = None) -> Message:
    """Return ``message`` as an ordered task is published: to its partition, numbered.

    Messages of other tasks, and messages already routed, are returned unchanged.

    Raises:
        ConfigurationError: A countdown, eta, priority or queue given to a call
            of an ordered task.
        TypeError: The arguments do not fit the function's signature.
        EncodeError: The key's value cannot be encoded as JSON.
        BackendError: The backend cannot number the message (nothing is published).
    """
    task = app.tasks.get(message.task)
    ordering = getattr(task, "ordering", None)
    if ordering is None or HEADER_OKEY in message.headers:
        return message
    assert task is not None
    where = f"Task {task.name!r} is ordered by {ordering.key!r}"
    if delay:
        raise ConfigurationError(
            f"{where}: a countdown or eta would let later calls of its key overtake this "
            "one. Send it without a delay (or delay the calls of the whole key yourself)."
        )
    if message.priority is not None:
        raise ConfigurationError(
            f"{where}: a priority would let one call of a key overtake another; send it "
            "without priority=."
        )
    if message.queue != task.queue:
        raise ConfigurationError(
            f"{where} on queue {task.queue!r}: its calls cannot go to {message.queue!r} "
            "(the partitions of a key belong to the task's queue)."
        )
    return _numbered(app, task, message)


def _numbered(app: App, task: Task[Any, Any], message: Message) -> Message:
    ordering = task.ordering
    assert ordering is not None
    bound = task.signature.bind(*message.args, **message.kwargs)
    bound.apply_defaults()
    okey = ordering.okey(bound.arguments)
    if app.transport.native_ordering_refused(task.queue) is None:
        return message.copy(queue=task.queue, headers={**message.headers, HEADER_OKEY: okey})
    seq = app.backend.incr(sequence_key(task.queue, okey), ttl=app.settings.ordering_state_ttl)
    headers = {**message.headers, HEADER_OKEY: okey, HEADER_OSEQ: seq}
    return message.copy(queue=ordering.partition(task.queue, okey), headers=headers)


def reroute(app: App, task: Task[Any, Any], message: Message, delivery: Delivery) -> str:
    """Publish ``message``, received on its task's base queue, through its key's partition.

    The body goes as received; the message gets the next sequence number of its
    key, so it runs after what is already queued for the key.

    Returns:
        The partition queue it went to.

    Raises:
        MQTasksError: The backend or the broker failed (the caller requeues it).
    """
    headers = {k: v for k, v in message.headers.items() if k not in (HEADER_OKEY, HEADER_OSEQ)}
    routed = _numbered(app, task, message.copy(headers=headers, queue=task.queue, priority=None))
    app.transport.declare([app.queue(routed.queue)])
    app.transport.publish(routed.queue, routed.to_envelope(delivery.body))
    logger.info(
        "ordering.rerouted",
        task_id=message.id,
        task_name=task.name,
        queue=delivery.queue,
        partition=routed.queue,
        seq=routed.headers.get(HEADER_OSEQ),
    )
    return routed.queue
