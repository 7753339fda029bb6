"""Broadcast tasks: every running worker that serves the task's queue runs each call once.

``@app.task(broadcast=True)`` is for work every worker must do itself
(invalidating a local cache, reloading configuration). A call is not put in
the task's queue: it is published once to the exchange
``Settings.broadcast_exchange`` (:data:`BROADCAST_EXCHANGE` by default) under the task's name, and the broker copies it
into one queue per worker, ``<queue>.bcast.<worker id>``, which each worker
serving ``<queue>`` declares and binds at start, before it consumes, and
unbinds and deletes at stop. That queue belongs to its worker alone: on
RabbitMQ a classic, non-durable queue with ``x-expires``, which the broker
deletes once its worker has been gone that long; on ``redis://`` and
``memory://`` a binding kept live by its worker (it binds again every third
of :data:`QUEUE_EXPIRES`), which an emit skips and removes, with the queue,
once it is no longer live.

A worker that is not running when a call is made never gets it. A call no
worker is bound for raises :class:`~mqtasks.exceptions.Unroutable`. Retries of
a broadcast run go back to its worker's queue (held by the broker's delay);
its dead letters go to the task's queue's dead-letter queue. A broadcast call
has one outcome per worker and stores no result (:class:`BroadcastHandle`).

This module holds the option's checks (:func:`broadcast_option`,
:func:`refuse_in_workflow`), the publish path (:func:`send`) and the worker's
part (:class:`WorkerBroadcast`).
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from .exceptions import ConfigurationError, PublishError, TransportError, Unroutable
from .handle import TaskHandle
from .message import Message
from .transport.base import Capabilities
from .transport.queue import DLQ_SUFFIX, QueueSpec
from .transport.topic import check_pattern
from .types import Seconds

if TYPE_CHECKING:
    from .task import Task
    from .worker import Worker

__all__ = [
    "BROADCAST_EXCHANGE",
    "INFIX",
    "QUEUE_EXPIRES",
    "BroadcastHandle",
    "WorkerBroadcast",
    "broadcast_option",
    "queue_name",
    "refuse_in_workflow",
    "require_broadcast",
    "send",
    "worker_queue",
]

logger = structlog.get_logger("mqtasks.broadcast")

#: The exchange broadcast calls are published to, routed by task name.
BROADCAST_EXCHANGE = "mqtasks.broadcast"  # the default of Settings.broadcast_exchange

#: Seconds a worker's broadcast queue outlives its worker: RabbitMQ deletes it
#: once it has had no consumer this long (``x-expires``); on ``redis://`` and
#: ``memory://`` its binding stops receiving this long after its worker last
#: bound it (a live worker binds again every third of it).
QUEUE_EXPIRES = 30.0

#: Part of a worker's broadcast queue name between the task queue and the worker id.
INFIX = ".bcast."


def queue_name(queue: str, worker_id: str) -> str:
    """Return the name of worker ``worker_id``'s broadcast queue for task queue ``queue``."""
    return f"{queue}{INFIX}{worker_id}"


def worker_queue(base: QueueSpec, worker_id: str, expires: float | None = None) -> QueueSpec:
    """Return the spec of a worker's broadcast queue for task queue ``base``.

    A classic, non-durable queue that expires ``expires`` seconds
    (:data:`QUEUE_EXPIRES` by default) after its worker is gone, whose dead
    letters go to ``base``'s dead-letter queue; ``base``'s priorities and
    delivery limit carry over.
    """
    return QueueSpec(
        queue_name(base.name, worker_id),
        queue_type="classic",
        max_priority=base.max_priority,
        delivery_limit=base.delivery_limit,
        durable=False,
        expires=QUEUE_EXPIRES if expires is None else expires,
        dead_letter_queue=base.name + DLQ_SUFFIX,
    )


# -- the option ---------------------------------------------------------------------


def broadcast_option(task: Task[Any, Any]) -> bool:
    """Take the ``broadcast`` option out of ``task.options``; refuse what it cannot go with.

    A broadcast task stores no result (``ignore_result`` is set).

    Raises:
        ConfigurationError: ``broadcast=True`` with ``unique_for``, ``idempotent``,
            ``ordering_key`` or ``ignore_result=False``; a task name that cannot
            be a routing key; or a broker that cannot broadcast.
    """
    value = task.options.pop("broadcast", False)
    if not isinstance(value, bool):
        raise ConfigurationError(f"Task {task.name!r}: broadcast must be True or False.")
    if not value:
        return False
    for option, given in (
        ("unique_for", task.unique_for is not None),
        ("idempotent", bool(task.options.get("idempotent"))),
        ("ordering_key", task.options.get("ordering_key") is not None),
        ("ignore_result=False", task.options.get("ignore_result", True) is not True),
    ):
        if given:
            raise ConfigurationError(
                f"Task {task.name!r} cannot be broadcast=True with {option}: every "
                "running worker of its queue runs each call once, under the same id, "
                "and stores no result. Make the task itself idempotent instead."
            )
    try:
        check_pattern(task.name)
    except ValueError as exc:
        raise ConfigurationError(
            f"Task {task.name!r}: a broadcast task's name routes its calls: {exc}"
        ) from None
    if any(word in ("*", "#") for word in task.name.split(".")):
        raise ConfigurationError(
            f"Task {task.name!r}: a broadcast task's name may not have '*' or '#' as a word."
        )
    require_broadcast(task.app.transport.capabilities, task.app.transport.schemes[0])
    task.options["ignore_result"] = True
    return True


def require_broadcast(capabilities: Capabilities, scheme: str) -> None:
    """Refuse broadcast tasks on a broker that cannot route them or drop a dead worker's queue.

    Raises:
        ConfigurationError: The transport lacks ``exchanges`` or ``expiring_queues``.
    """
    if not (capabilities.exchanges and capabilities.expiring_queues):
        raise ConfigurationError(
            f"{scheme}:// cannot run broadcast tasks (they need an exchange that copies a "
            "call into each worker's queue, and a queue the broker drops once its worker "
            "is gone): use amqp://, redis:// or memory://."
        )


def refuse_in_workflow(task: Task[Any, Any]) -> None:
    """Refuse a signature of a broadcast task (chains, groups, chords, map).

    Raises:
        ConfigurationError: ``task`` is a broadcast task.
    """
    if task.broadcast:
        raise ConfigurationError(
            f"Task {task.name!r} is a broadcast task: it runs once per worker and has "
            "no single result, so it cannot be a step of a chain, group or chord, nor "
            "be sent with map()/starmap(). Call delay() for each broadcast."
        )


# -- publishing ---------------------------------------------------------------------


@dataclass(frozen=True)
class BroadcastHandle(TaskHandle):
    """What ``delay()`` of a broadcast task returns, once the broker has the call.

    :meth:`get` raises: every worker runs the call, and none stores a result.
    """

    #: How many worker queues got the call; None where the broker does not say (RabbitMQ).
    routed: int | None = None

    def get(self, timeout: Seconds | None = None, **_: Any) -> Any:
        """Refuse: a broadcast call has no single result.

        Raises:
            ConfigurationError: Always; the message says what to do instead.
        """
        raise ConfigurationError(
            f"Task {self.task!r} ({self.id}) is a broadcast task: every running worker of "
            "its queue runs the call, and none stores a result. To wait for work it "
            "starts, have it send a task (or record what it did) and wait for that."
        )


def send(
    task: Task[Any, Any],
    message: Message,
    *,
    delay: float | None,
    idempotency_key: str | None,
    queue: str | None,
) -> BroadcastHandle:
    """Publish a broadcast call once to the broadcast exchange; return once the broker has it.

    The publish middleware runs as for ``delay()``.

    Raises:
        ConfigurationError: ``countdown``/``eta``, ``idempotency_key`` or another
            ``queue`` for a broadcast task.
        Unroutable: No running worker serves the task (no queue is bound).
        PublishError: The broker did not take the call.
    """
    if idempotency_key is not None:
        raise ConfigurationError(
            f"Task {task.name!r} is a broadcast task: apply_async(idempotency_key=...) "
            "is refused, as every worker runs each call."
        )
    if delay:
        raise ConfigurationError(
            f"Task {task.name!r} is a broadcast task: it goes to the workers running "
            "when it is sent, so countdown and eta are refused."
        )
    if queue is not None and queue != task.queue:
        raise ConfigurationError(
            f"Task {task.name!r} is a broadcast task of queue {task.queue!r}: it reaches "
            "the workers of that queue, so apply_async(queue=...) is refused."
        )
    app = task.app
    message, envelope = app._prepare(message, task._names)
    try:
        routed = app.transport.emit(
            app.settings.broadcast_exchange, task.name, envelope, mandatory=True
        )
    except BaseException as exc:
        error = _not_published(task, message, exc)
        app._hooks.after_publish_error(app, [message], error)
        if error is exc:
            raise
        raise error from exc
    app._hooks.after_publish(app, [message])
    return BroadcastHandle(
        message.id, task.name, task.queue, app=app, routed=routed if routed >= 0 else None
    )


def _not_published(task: Task[Any, Any], message: Message, exc: BaseException) -> BaseException:
    """Return the error a failed broadcast publish raises: ``exc``, or what it means."""
    where = f"Broadcast task {task.name!r} ({message.id}) was NOT published"
    if isinstance(exc, Unroutable):
        return Unroutable(
            f"{where}: no running worker serves it (no worker of queue {task.queue!r} "
            "with this task is bound). Start a worker first: a worker not running when "
            "a broadcast is sent never gets it.",
            task_id=message.id,
        )
    if isinstance(exc, TransportError) and not isinstance(exc, PublishError):
        return PublishError(f"{where}: {exc}", task_id=message.id)
    return exc


# -- the worker's part ------------------------------------------------------------------


class WorkerBroadcast:
    """A worker's broadcast queues: declared and bound at start, kept live, removed at stop.

    Args:
        worker: The worker; its queues' broadcast tasks get a queue of this worker.

    Raises:
        ConfigurationError: The worker serves a broadcast task on a broker that
            cannot broadcast.
    """

    def __init__(self, worker: Worker) -> None:
        app = worker.app
        self.app = app
        #: This worker's id in its broadcast queue names.
        self.worker_id = uuid.uuid4().hex[:12]
        served = set(worker.queues)
        #: The broadcast tasks this worker runs.
        self.tasks = [t for t in app.tasks.values() if t.broadcast and t.queue in served]
        self._home: dict[str, str] = {}
        #: This worker's broadcast queue of each task queue with broadcast tasks.
        self.specs: list[QueueSpec] = []
        if self.tasks:
            transport = app.transport
            require_broadcast(transport.capabilities, transport.schemes[0])
        for queue in dict.fromkeys(t.queue for t in self.tasks):
            spec = worker_queue(app.queue(queue), self.worker_id)
            self.specs.append(spec)
            self._home[spec.name] = queue
            worker.delivery_limits[spec.name] = app.delivery_limit(queue)
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._bound = False

    def __repr__(self) -> str:
        return f"<WorkerBroadcast {self.worker_id} queues={[s.name for s in self.specs]}>"

    def home(self, queue: str) -> str:
        """Return the task queue ``queue`` serves: itself, or the one a broadcast queue is for."""
        return self._home.get(queue, queue)

    def _bindings(self) -> list[tuple[str, QueueSpec]]:
        by_queue = {self._home[s.name]: s for s in self.specs}
        return [(t.name, by_queue[t.queue]) for t in self.tasks]

    def start(self) -> None:
        """Declare and bind this worker's broadcast queues (before it consumes them), and
        start keeping them live.

        Raises:
            ConnectionFailed: The broker cannot be reached.
            TransportError: The broker refused a declaration.
        """
        if not self.specs:
            return
        self._bind_all()
        self._bound = True
        self._stop.clear()
        self._keeper = threading.Thread(target=self._keep, name="mqtasks-broadcast", daemon=True)
        self._keeper.start()
        logger.info(
            "broadcast.bound",
            queues=[s.name for s in self.specs],
            tasks=[t.name for t in self.tasks],
        )

    def _bind_all(self) -> None:
        transport = self.app.transport
        for pattern, spec in self._bindings():
            transport.bind(self.app.settings.broadcast_exchange, pattern, spec)

    def _keep(self) -> None:
        interval = min(s.expires or QUEUE_EXPIRES for s in self.specs) / 3
        while not self._stop.wait(interval):
            try:
                self._bind_all()
            except Exception as exc:  # the broker is away: the next round tries again
                self.app.transport.forget_declared()
                logger.warning("broadcast.bind_failed", error=f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        """Stop keeping the queues live, unbind them and delete them (with what they hold).

        Never raises: a queue left behind expires on its own.
        """
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=5.0)
            self._keeper = None
        if not self._bound:
            return
        self._bound = False
        transport = self.app.transport
        try:
            for pattern, spec in self._bindings():
                transport.unbind(self.app.settings.broadcast_exchange, pattern, spec.name)
            transport.delete(self.specs)
        except Exception as exc:
            logger.warning(
                "broadcast.cleanup_failed",
                queues=[s.name for s in self.specs],
                error=f"{type(exc).__name__}: {exc}",
                note="they expire on their own",
            )
        else:
            logger.info("broadcast.unbound", queues=[s.name for s in self.specs])
