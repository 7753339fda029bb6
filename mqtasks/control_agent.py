"""The worker's side of heartbeats and remote control: :class:`ControlAgent`.

``mqtasks worker`` runs one beside every worker (a companion, as the
autoscaler is). One thread, with a consumer of its own (its own connection):
every :data:`~mqtasks.control_protocol.HEARTBEAT_INTERVAL` seconds it emits the
worker's heartbeat; between beats it answers requests from its control queue,
looked up in a fixed table of commands (:data:`COMMANDS
<mqtasks.control_protocol.COMMANDS>`). A message that is not exactly a request
of this app, from its broker namespace, for a known command with a valid
argument is acknowledged, ignored and logged as ``control.rejected`` with the
reason; no message names code the worker would import or call.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from . import control_protocol as wire
from .transport.base import Consumer, Delivery

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["ControlAgent", "signal_shutdown"]

logger = structlog.get_logger("mqtasks.control")

_sequence = itertools.count()
#: Seconds a command that runs on the worker's I/O thread (add/cancel consumer) may take.
_IO_TIMEOUT = 10.0


def _version() -> str:
    # Read from the package (always imported first) at run time: importing it
    # here would import the worker, a layer above this module.
    return str(getattr(sys.modules.get("mqtasks"), "__version__", "unknown"))


def signal_shutdown() -> None:
    """Stop this worker process as SIGTERM does: its supervisor's, under ``--processes``.

    The supervisor then stops every child, each finishing its running tasks,
    and exits 0 once they have: the whole worker stops, none is replaced.
    """
    supervisor = os.environ.get("MQTASKS_SUPERVISOR_PID", "")
    target = int(supervisor) if supervisor.isdigit() else os.getpid()
    os.kill(target, signal.SIGTERM)


class ControlAgent:
    """Sends ``worker``'s heartbeats and answers inspect and control requests.

    A companion of the worker: :meth:`start` once it consumes, :meth:`stop`
    before it stops. On a broker that cannot carry them (``redis+kombu://``)
    it logs ``control.unavailable`` once and does nothing.

    Args:
        worker: The worker it reports on and controls.
        shutdown: What ``shutdown`` does once answered; :func:`signal_shutdown`
            (SIGTERM to the worker process or its supervisor) by default.
        interval: Seconds between heartbeats.
    """

    def __init__(
        self,
        worker: Worker,
        *,
        shutdown: Callable[[], None] | None = None,
        interval: float = wire.HEARTBEAT_INTERVAL,
    ) -> None:
        self.worker = worker
        self.app = worker.app
        #: This worker's id in heartbeats and replies (``--worker ID``).
        self.worker_id = wire.worker_id(next(_sequence))
        self.interval = interval
        self._shutdown = shutdown or signal_shutdown
        word = wire.app_word(self.app)
        self._heartbeat_key = f"{word}.hb.{self.worker_id}"
        self._reply_prefix = f"{word}.reply."
        self._patterns = [f"{word}.ctl.all", f"{word}.ctl.id.{self.worker_id}"]
        self.spec = wire.owned_queue(f"mqtasks.ctl.{word}.{self.worker_id}")
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None
        self._shutdown_due = False
        self._commands: dict[str, Callable[[Any], Any]] = {
            "ping": lambda _: "pong",
            "active": lambda _: self.worker.execution.active(),
            "stats": lambda _: self.stats(),
            "registered": lambda _: sorted(self.app.tasks),
            "shutdown": self._ask_shutdown,
            "pool-grow": lambda n: self._resize(self.worker.concurrency + n),
            "pool-shrink": lambda n: self._resize(self.worker.concurrency - n),
            "cancel-consumer": self._cancel_consumer,
            "add-consumer": self._add_consumer,
        }
        assert set(self._commands) == set(wire.COMMANDS)

    def __repr__(self) -> str:
        return f"<ControlAgent {self.worker_id}>"

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Bind the control queue, start consuming it and send the first heartbeat.

        Never raises: a worker runs on without remote control (logged
        ``control.unavailable`` or ``control.start_failed``).
        """
        try:
            wire.require_control(self.app)
        except Exception as exc:
            logger.warning("control.unavailable", reason=str(exc))
            return
        try:
            self._bind()
            consumer = self.app.transport.consumer([self.spec], prefetch=16)
            consumer.start(self._on_delivery)
        except Exception as exc:
            logger.warning("control.start_failed", error=f"{type(exc).__name__}: {exc}")
            return
        self._consumer = consumer
        self._stop.clear()
        self._thread = threading.Thread(target=self._main, name="mqtasks-control", daemon=True)
        self._thread.start()
        logger.info("control.started", worker_id=self.worker_id, queue=self.spec.name)

    def stop(self) -> None:
        """Say goodbye (monitors drop the worker at once), stop, remove the control queue.

        Never raises: a queue left behind expires on its own.
        """
        self._stop.set()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.interrupt()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._thread = None
        if consumer is None:
            return
        transport = self.app.transport
        try:
            transport.emit(
                wire.CONTROL_EXCHANGE,
                self._heartbeat_key,
                wire.encode(self.app, "goodbye", worker_id=self.worker_id),
                mandatory=False,
            )
            consumer.close()
            for pattern in self._patterns:
                transport.unbind(wire.CONTROL_EXCHANGE, pattern, self.spec.name)
            transport.delete([self.spec])
        except Exception as exc:
            logger.warning("control.cleanup_failed", error=f"{type(exc).__name__}: {exc}")

    def _bind(self) -> None:
        for pattern in self._patterns:
            self.app.transport.bind(wire.CONTROL_EXCHANGE, pattern, self.spec)

    def _main(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        beat_at = time.monotonic()
        bind_at = beat_at + wire.QUEUE_EXPIRES / 3
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= bind_at:  # keeps the binding live where the broker cannot tell
                    self._bind()
                    bind_at = now + wire.QUEUE_EXPIRES / 3
                if now >= beat_at:
                    self.beat()
                    beat_at = now + self.interval
                consumer.drain(timeout=max(0.01, min(0.5, beat_at - time.monotonic())))
            except Exception as exc:  # the broker is away: the next round tries again
                self.app.transport.forget_declared()
                logger.warning("control.heartbeat_failed", error=f"{type(exc).__name__}: {exc}")
                self._stop.wait(min(self.interval, 1.0))
            if self._shutdown_due:
                self._shutdown_due = False
                logger.warning("control.shutdown", worker_id=self.worker_id)
                self._shutdown()

    # -- heartbeats ----------------------------------------------------------------

    def heartbeat(self) -> wire.Heartbeat:
        """This worker's heartbeat now."""
        w = self.worker
        execution = w.execution
        return wire.Heartbeat(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=list(w.queues),
            concurrency=w.concurrency,
            busy=w.running,
            done=execution.done,
            failed=execution.failed,
            rss=wire.rss_bytes(),
            version=_version(),
            sent_at=time.time(),
            active=execution.active(),
        )

    def beat(self) -> None:
        """Emit one heartbeat (no monitor listening: dropped)."""
        envelope = wire.encode(self.app, "heartbeat", **self.heartbeat().as_dict())
        self.app.transport.emit(
            wire.CONTROL_EXCHANGE, self._heartbeat_key, envelope, mandatory=False
        )

    def stats(self) -> dict[str, Any]:
        """The answer to ``stats``: the heartbeat's figures and the worker's settings."""
        w = self.worker
        found = self.heartbeat().as_dict()
        del found["active"]
        found.update(
            prefetch=w.prefetch,
            received=w.received,
            settled=w.settled,
            uptime=round(time.time() - self._started, 3),
            supervised=bool(os.environ.get("MQTASKS_SUPERVISOR_PID")),
            broker=repr(self.app.transport),
        )
        return found

    # -- requests ------------------------------------------------------------------

    def _on_delivery(self, delivery: Delivery) -> None:
        consumer = self._consumer
        try:
            self._handle(delivery)
        finally:
            if consumer is not None:
                with contextlib.suppress(Exception):
                    consumer.ack(delivery)

    def _handle(self, delivery: Delivery) -> None:
        try:
            if delivery.refused:
                raise wire.Rejected("refused_by_transport", delivery.refused)
            request = wire.decode(self.app, delivery.body, frozenset({"request"}))
            destination = request.get("destination")
            if destination is not None and destination != self.worker_id:
                raise wire.Rejected("wrong_destination", destination[:80])
        except wire.Rejected as rejected:
            wire.log_rejected(rejected, delivery)
            return
        command, argument = request["command"], request.get("argument")
        logger.info("control.command", command=command, argument=argument, id=request["id"])
        answer: Any = None
        error: str | None = None
        try:
            answer = self._commands[command](argument)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
        reply = wire.encode(
            self.app,
            "reply",
            id=request["id"],
            worker_id=self.worker_id,
            answer=answer,
            error=error,
        )
        try:
            self.app.transport.emit(
                wire.CONTROL_EXCHANGE,
                self._reply_prefix + request["reply_to"],
                reply,
                mandatory=False,
            )
        except Exception as exc:
            logger.warning("control.reply_failed", error=f"{type(exc).__name__}: {exc}")

    def _ask_shutdown(self, _: Any) -> str:
        self._shutdown_due = True  # once the reply is sent
        return "shutting down"

    def _resize(self, concurrency: int) -> dict[str, int]:
        previous = self.worker.concurrency
        self.worker.resize(concurrency)
        return {"concurrency": self.worker.concurrency, "previous": previous}

    def _on_io(self, call: Callable[[Consumer], None]) -> None:
        """Run ``call(consumer)`` on the worker's I/O thread; wait for it; raise its error."""
        done = threading.Event()
        failure: list[BaseException] = []

        def run(consumer: Consumer) -> None:
            try:
                call(consumer)
            except BaseException as exc:
                failure.append(exc)
            finally:
                done.set()

        self.worker.call_on_io(run)
        if not done.wait(_IO_TIMEOUT):
            raise TimeoutError("the worker's I/O thread did not take the change in time")
        if failure:
            raise failure[0]

    def _refuse_special(self, queue: str) -> None:
        if any(t.queue == queue and t.ordering is not None for t in self.app.tasks.values()):
            raise ValueError(
                f"queue {queue!r} holds ordered tasks: its partitions are consumed by "
                "lease, which this command would bypass"
            )
        if queue in {s.name for s in self.worker.broadcast.specs}:
            raise ValueError(f"{queue!r} is this worker's broadcast queue")

    def _cancel_consumer(self, queue: str) -> dict[str, Any]:
        w = self.worker
        if queue not in w.queues:
            raise ValueError(f"not consuming {queue!r} (consuming: {', '.join(w.queues)})")
        if len(w.queues) == 1:
            raise ValueError(f"{queue!r} is the last queue this worker consumes")
        self._refuse_special(queue)
        self._on_io(lambda consumer: consumer.remove_queue(queue))
        w.queues = [q for q in w.queues if q != queue]
        logger.info("control.consumer_cancelled", queue=queue)
        return {"queues": list(w.queues)}

    def _add_consumer(self, queue: str) -> dict[str, Any]:
        w, app = self.worker, self.app
        if queue in w.queues:
            return {"queues": list(w.queues), "note": f"consuming {queue!r} already"}
        known = set(app.task_queues()) | set(app.queues) | {s.queue for s in app.subscriptions}
        if queue not in known:
            raise ValueError(f"{queue!r} is not a queue of this app's tasks or configuration")
        self._refuse_special(queue)
        spec = app.queue(queue)
        w.delivery_limits[queue] = app.delivery_limit(queue)
        self._on_io(lambda consumer: consumer.add_queue(spec))
        w.queues = [*w.queues, queue]
        logger.info("control.consumer_added", queue=queue)
        return {"queues": list(w.queues)}
