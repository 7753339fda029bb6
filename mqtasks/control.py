"""Workers that report themselves: heartbeats, ``inspect`` and ``control``.

Every worker started by ``mqtasks worker`` runs a :class:`ControlAgent`, which
emits a :class:`Heartbeat` every :data:`HEARTBEAT_INTERVAL` seconds and answers
requests. A :class:`HeartbeatMonitor` follows the heartbeats of an app's
workers (a worker silent for :data:`LOST_AFTER` seconds is shown as lost); an
:class:`Inspector` asks every live worker (or one) a question or gives it a
command, and collects the answers that come within its timeout. What travels
and how it is checked is :mod:`mqtasks.control_protocol`'s.

Works on ``amqp://``, ``redis://`` and ``memory://`` (``memory://``: workers of
this process only); ``redis+kombu://`` has no exchanges, and is refused with a
:class:`~mqtasks.exceptions.ConfigurationError`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from . import control_protocol as wire
from .control_agent import ControlAgent
from .control_protocol import (
    COMMANDS,
    CONTROL_EXCHANGE,
    HEARTBEAT_INTERVAL,
    LOST_AFTER,
    Heartbeat,
    Rejected,
)
from .transport.base import Consumer, Delivery, QueueSpec

if TYPE_CHECKING:
    from .app import App

__all__ = [
    "COMMANDS",
    "FORGET_AFTER",
    "HEARTBEAT_INTERVAL",
    "LOST_AFTER",
    "ControlAgent",
    "Heartbeat",
    "HeartbeatMonitor",
    "Inspector",
    "WorkerView",
]

logger = structlog.get_logger("mqtasks.control")

#: Seconds a lost worker stays listed (as lost) before a monitor forgets it.
FORGET_AFTER = 600.0


class _Listener:
    """A queue of this process bound to the control exchange, drained by the caller.

    Args:
        app: Whose messages it takes (others are refused).
        name: The queue name (unique to this process).
        pattern: What it is bound under.
        kinds: The kinds of message it takes.
        on_message: Called with each accepted message.
    """

    def __init__(
        self,
        app: App,
        name: str,
        pattern: str,
        kinds: frozenset[str],
        on_message: Any,
    ) -> None:
        wire.require_control(app)
        self.app = app
        self.spec: QueueSpec = wire.owned_queue(name)
        self.pattern = pattern
        self.kinds = kinds
        self.on_message = on_message
        self.consumer: Consumer | None = None
        self.bound_at = 0.0

    def open(self) -> None:
        """Bind the queue and start consuming it."""
        self.bind()
        consumer = self.app.transport.consumer([self.spec], prefetch=64)
        consumer.start(self._on_delivery)
        self.consumer = consumer

    def bind(self) -> None:
        """Bind (again: where the broker cannot tell a live queue, that keeps it live)."""
        self.app.transport.bind(CONTROL_EXCHANGE, self.pattern, self.spec)
        self.bound_at = time.monotonic()

    def drain(self, timeout: float) -> None:
        """Take what arrives within ``timeout`` seconds; bind again when due."""
        if time.monotonic() - self.bound_at > wire.QUEUE_EXPIRES / 3:
            self.bind()
        assert self.consumer is not None
        self.consumer.drain(timeout=timeout)

    def close(self) -> None:
        """Stop consuming; unbind and delete the queue. Never raises."""
        consumer, self.consumer = self.consumer, None
        try:
            if consumer is not None:
                consumer.close()
            self.app.transport.unbind(CONTROL_EXCHANGE, self.pattern, self.spec.name)
            self.app.transport.delete([self.spec])
        except Exception as exc:  # it expires on its own
            logger.debug("control.cleanup_failed", error=f"{type(exc).__name__}: {exc}")

    def _on_delivery(self, delivery: Delivery) -> None:
        try:
            data = wire.decode(self.app, delivery.body, self.kinds)
        except Rejected as rejected:
            wire.log_rejected(rejected, delivery)
        else:
            self.on_message(data)
        finally:
            if self.consumer is not None:
                with contextlib.suppress(Exception):
                    self.consumer.ack(delivery)


@dataclass(frozen=True)
class WorkerView:
    """A worker as a monitor sees it.

    Attributes:
        heartbeat: Its last heartbeat.
        last_seen: When that arrived (epoch seconds, the monitor's clock).
        lost: Whether it has been silent for :data:`LOST_AFTER` seconds.
    """

    heartbeat: Heartbeat
    last_seen: float
    lost: bool


class HeartbeatMonitor:
    """Follows the heartbeats of ``app``'s workers in a background thread.

    A worker that stops cleanly says goodbye and leaves the list; one silent
    for ``lost_after`` seconds (killed, hung, cut off) is shown as lost, for
    :data:`FORGET_AFTER` seconds.

    Args:
        app: Whose workers it follows.
        lost_after: Seconds of silence before a worker is lost.

    Raises:
        ConfigurationError: The broker cannot carry heartbeats (``redis+kombu://``).
    """

    def __init__(self, app: App, *, lost_after: float = LOST_AFTER) -> None:
        self.app = app
        self.lost_after = lost_after
        word = wire.app_word(app)
        self._listener = _Listener(
            app,
            f"mqtasks.mon.{word}.{wire.new_id()[:16]}",
            f"{word}.hb.#",
            frozenset({"heartbeat", "goodbye"}),
            self._on_message,
        )
        self._seen: dict[str, tuple[Heartbeat, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HeartbeatMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind the monitor's queue and start following heartbeats.

        Raises:
            ConnectionFailed: The broker cannot be reached.
        """
        if self._thread is not None:
            return
        self._listener.open()
        self._stop.clear()
        self._thread = threading.Thread(target=self._main, name="mqtasks-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following; remove the monitor's queue."""
        self._stop.set()
        if self._listener.consumer is not None:
            self._listener.consumer.interrupt()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self._listener.close()

    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                self._listener.drain(0.25)
            except Exception as exc:
                self.app.transport.forget_declared()
                logger.warning("monitor.receive_failed", error=f"{type(exc).__name__}: {exc}")
                self._stop.wait(1.0)

    def _on_message(self, data: dict[str, Any]) -> None:
        with self._lock:
            if data["kind"] == "goodbye":
                self._seen.pop(data["worker_id"], None)
            else:
                beat = wire.heartbeat_of(data)
                self._seen[beat.worker_id] = (beat, time.time())

    def workers(self) -> list[WorkerView]:
        """Every worker seen, by id: live ones, and lost ones for :data:`FORGET_AFTER` s."""
        now = time.time()
        with self._lock:
            for worker_id, (_, seen) in list(self._seen.items()):
                if now - seen > FORGET_AFTER:
                    del self._seen[worker_id]
            seen_now = sorted(self._seen.items())
        return [
            WorkerView(beat, seen, now - seen > self.lost_after) for _, (beat, seen) in seen_now
        ]


class Inspector:
    """Asks ``app``'s live workers, and collects the answers within ``timeout`` seconds.

    Each method returns the answers by worker id; a worker whose command
    failed answers ``{"error": "..."}``. A worker that does not answer in time
    is absent. Addressed to one worker (``destination``), it returns as soon as
    that one answers.

    Args:
        app: Whose workers it asks.
        timeout: Seconds to wait for answers.
        destination: One worker's id (``Heartbeat.worker_id``); None: all.

    Raises:
        ConfigurationError: The broker cannot carry control messages (``redis+kombu://``).
    """

    def __init__(self, app: App, timeout: float = 2.0, *, destination: str | None = None) -> None:
        wire.require_control(app)
        self.app = app
        self.timeout = timeout
        self.destination = destination

    def ping(self) -> dict[str, Any]:
        """``"pong"`` from each live worker."""
        return self.control("ping")

    def active(self) -> dict[str, Any]:
        """The running tasks of each worker (``{"id", "task", "started_at"}`` each)."""
        return self.control("active")

    def stats(self) -> dict[str, Any]:
        """Each worker's figures: the heartbeat's, prefetch, received, settled, uptime."""
        return self.control("stats")

    def registered(self) -> dict[str, Any]:
        """The task names each worker knows."""
        return self.control("registered")

    def control(
        self, command: str, argument: str | int | None = None, *, destination: str | None = None
    ) -> dict[str, Any]:
        """Send ``command`` (with ``argument``) and return the answers by worker id.

        Args:
            command: One of :data:`COMMANDS`.
            argument: A number of threads (``pool-grow``, ``pool-shrink``), a queue
                (``cancel-consumer``, ``add-consumer``), or None.
            destination: One worker's id; the inspector's by default.

        Raises:
            ValueError: An unknown command, or an argument it does not take.
            PublishError: The request was not published.
        """
        if command not in COMMANDS:
            raise ValueError(
                f"Unknown command {command!r}: use one of {', '.join(sorted(COMMANDS))}."
            )
        wanted = COMMANDS[command]
        if (wanted is None) != (argument is None) or (
            wanted is not None and (not isinstance(argument, wanted) or isinstance(argument, bool))
        ):
            takes = "no argument" if wanted is None else f"a {wanted.__name__} argument"
            raise ValueError(f"{command} takes {takes}, not {argument!r}.")
        destination = destination or self.destination
        request_id, reply_id = wire.new_id(), wire.new_id()
        word = wire.app_word(self.app)
        answers: dict[str, Any] = {}

        def collect(data: dict[str, Any]) -> None:
            if data["id"] != request_id:
                return
            error = data.get("error")
            answers[data["worker_id"]] = {"error": error} if error else data.get("answer")

        listener = _Listener(
            self.app,
            f"mqtasks.reply.{word}.{reply_id}",
            f"{word}.reply.{reply_id}",
            frozenset({"reply"}),
            collect,
        )
        listener.open()
        try:
            key = f"{word}.ctl.id.{destination}" if destination else f"{word}.ctl.all"
            request = wire.encode(
                self.app,
                "request",
                id=request_id,
                command=command,
                argument=argument,
                reply_to=reply_id,
                destination=destination,
            )
            self.app.transport.emit(CONTROL_EXCHANGE, key, request, mandatory=False)
            deadline = time.monotonic() + self.timeout
            while (remaining := deadline - time.monotonic()) > 0:
                if destination and destination in answers:
                    break
                listener.drain(min(0.1, remaining))
        finally:
            listener.close()
        return dict(sorted(answers.items()))
