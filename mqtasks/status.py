"""Queue health for operators: what is waiting, in flight, delayed and dead, and the trend.

``mqtasks status`` prints it; :func:`queue_status` (one sample) and
:class:`StatusMonitor` (repeated samples, with rates) are the Python API::

    from mqtasks.status import queue_status

    for s in queue_status(app):
        print(s.queue, s.ready, s.unacked, s.dead_lettered)

What each broker can tell differs; a count it cannot tell is ``None``, never
an estimate:

* RabbitMQ: ready messages and consumers (passive ``queue.declare``) and
  dead letters; unacknowledged messages, the lag (classic queues) and message
  rates come from the management plugin's HTTP API
  (``rabbitmq_management_url``), and are ``None`` when it does not answer;
  delayed messages are the total held in the shared delay queues of the vhost
  (``delayed_scope == "vhost"``).
* Redis (``redis://``): every count and the lag, from the queue's lists,
  delayed set and the consumer registry; no message rates.
* ``memory://``: every count and the lag, for the process the app lives in.

Without the management API no broker here counts the messages that pass
through a queue, so the rates are changes between samples: of the ready count
(:attr:`QueueStatus.ready_rate`: negative while consumers drain the queue,
positive while it backs up) and, unless the broker tells it, of the
dead-letter count (:attr:`QueueStatus.error_rate`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .app import App
    from .transport import QueueStats

__all__ = ["DEFAULT_RATE_WINDOW", "QueueStatus", "StatusMonitor", "queue_status"]

#: Seconds of samples a rate spans at most: the rate is that of the last minute.
DEFAULT_RATE_WINDOW = 60.0


@dataclass(frozen=True)
class QueueStatus:
    """The state of one queue at one moment.

    Attributes:
        queue: The queue's name.
        exists: False if the broker has no such queue; every count is then ``None``.
            Always True on Redis, where an absent queue is an empty one.
        ready: Messages waiting for a consumer.
        unacked: Messages delivered to consumers and not acknowledged yet
            (``None`` on RabbitMQ: see the module docstring).
        delayed: Messages held for a delay (countdowns, retry backoffs).
        delayed_scope: ``queue``, or ``vhost`` when :attr:`delayed` is the total for
            every queue of the RabbitMQ virtual host.
        dead_lettered: Entries of the queue's dead-letter queue (``None`` if it
            does not exist).
        consumers: Consumers attached to the queue.
        ready_rate: Change of :attr:`ready` per second since the oldest sample
            of the rate window (positive: backing up; negative: draining);
            ``None`` for a first sample.
        rate_window: Seconds between the two samples :attr:`ready_rate` compares.
        sampled_at: When the broker was asked (aware UTC).
        lag: Seconds the oldest ready message has waited since it was published
            (``0.0`` for an empty queue; a countdown or a retry's backoff is part
            of it); ``None`` if the broker cannot tell (RabbitMQ without the
            management API, or a quorum queue).
        error_rate: Messages dead-lettered per second (tasks that failed for
            good, were rejected or could not be read): RabbitMQ's management
            API measures it; elsewhere it is the rise of :attr:`dead_lettered`
            over the rate window, ``None`` for a first sample or when the
            dead-letter queue shrank (a replay or purge) meanwhile.
        publish_rate: Messages published to the queue per second (RabbitMQ's
            management API; ``None`` elsewhere).
        deliver_rate: Messages delivered to consumers per second (same source).
        ack_rate: Messages acknowledged per second (same source).
        redeliver_rate: Messages delivered again per second (same source).
    """

    queue: str
    exists: bool
    ready: int | None
    unacked: int | None
    delayed: int | None
    delayed_scope: Literal["queue", "vhost"]
    dead_lettered: int | None
    consumers: int | None
    ready_rate: float | None
    rate_window: float | None
    sampled_at: datetime
    lag: float | None = None
    error_rate: float | None = None
    publish_rate: float | None = None
    deliver_rate: float | None = None
    ack_rate: float | None = None
    redeliver_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the status as JSON-able values (``sampled_at`` in ISO 8601)."""
        return {
            "queue": self.queue,
            "exists": self.exists,
            "ready": self.ready,
            "unacked": self.unacked,
            "delayed": self.delayed,
            "delayed_scope": self.delayed_scope,
            "dead_lettered": self.dead_lettered,
            "consumers": self.consumers,
            "ready_rate": None if self.ready_rate is None else round(self.ready_rate, 3),
            "rate_window": None if self.rate_window is None else round(self.rate_window, 3),
            "sampled_at": self.sampled_at.isoformat(),
            "lag": _rounded(self.lag),
            "error_rate": _rounded(self.error_rate),
            "publish_rate": _rounded(self.publish_rate),
            "deliver_rate": _rounded(self.deliver_rate),
            "ack_rate": _rounded(self.ack_rate),
            "redeliver_rate": _rounded(self.redeliver_rate),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _lag(stats: QueueStats, now: float) -> float | None:
    """Seconds the head of the queue has waited, 0 when empty, None when unknown."""
    if not stats.exists or stats.ready is None:
        return None
    if stats.ready == 0:
        return 0.0
    if stats.head_published_at is None:
        return None
    return max(0.0, now - stats.head_published_at)


class StatusMonitor:
    """Samples the status of queues, again and again, with rates from past samples.

    Each :meth:`sample` compares the ready counts with those of the oldest
    sample taken at most ``window`` seconds before (or, if there is none that
    recent, the latest one before it).

    Args:
        app: The app whose broker to ask.
        queues: Queue names; the app's task queues by default.
        window: Longest span, in seconds, a rate is computed over.

    Raises:
        ConfigurationError: A queue name is not valid, or ``window`` is not positive.
    """

    def __init__(
        self, app: App, queues: Sequence[str] | None = None, *, window: float = DEFAULT_RATE_WINDOW
    ) -> None:
        if not window > 0:
            raise ConfigurationError(f"The rate window must be positive seconds, not {window!r}.")
        self.app = app
        names = list(dict.fromkeys(queues)) if queues else app.task_queues()
        #: The queues sampled, in order.
        self.specs = [app.queue(name) for name in names]
        self.window = window
        self._history: deque[tuple[float, dict[str, int | None], dict[str, int | None]]] = deque()

    def sample(self) -> list[QueueStatus]:
        """Ask the broker now; return one status per queue, in order.

        Raises:
            ConnectionFailed: The broker cannot be reached (the message masks the
                URL's password).
            TransportError: The broker refused.
        """
        stats = self.app.transport.queue_stats(
            self.specs, management_url=self.app.settings.rabbitmq_management_url
        )
        now = time.monotonic()
        sampled_at = datetime.now(timezone.utc)
        wall = sampled_at.timestamp()
        history = self._history
        while len(history) > 1 and now - history[0][0] > self.window:
            history.popleft()
        base = history[0] if history else None
        out: list[QueueStatus] = []
        for spec in self.specs:
            s = stats[spec.name]
            rate = span = None
            errors = s.dead_letter_rate
            if base is not None and s.ready is not None and now > base[0]:
                before = base[1].get(spec.name)
                if before is not None:
                    span = now - base[0]
                    rate = (s.ready - before) / span
            if errors is None and base is not None and s.dead_lettered is not None:
                dead_before = base[2].get(spec.name)
                rise = None if dead_before is None else s.dead_lettered - dead_before
                if rise is not None and rise >= 0 and now > base[0]:
                    errors = rise / (now - base[0])
            out.append(
                QueueStatus(
                    queue=spec.name,
                    exists=s.exists,
                    ready=s.ready,
                    unacked=s.unacked,
                    delayed=s.delayed,
                    delayed_scope=s.delayed_scope,
                    dead_lettered=s.dead_lettered,
                    consumers=s.consumers,
                    ready_rate=rate,
                    rate_window=span,
                    sampled_at=sampled_at,
                    lag=_lag(s, wall),
                    error_rate=errors,
                    publish_rate=s.publish_rate,
                    deliver_rate=s.deliver_rate,
                    ack_rate=s.ack_rate,
                    redeliver_rate=s.redeliver_rate,
                )
            )
        # A missing queue holds nothing: one declared later shows as backing up.
        history.append(
            (
                now,
                {s.queue: s.ready if s.exists else 0 for s in out},
                {s.queue: s.dead_lettered for s in out},
            )
        )
        return out


def queue_status(app: App, queues: Sequence[str] | None = None) -> list[QueueStatus]:
    """Return the status of ``queues`` (the app's task queues by default), one sample.

    A queue that does not exist is reported with ``exists=False``. Rates need
    two samples: use :class:`StatusMonitor` for them.

    Raises:
        ConfigurationError: A queue name is not valid.
        ConnectionFailed: The broker cannot be reached.
    """
    return StatusMonitor(app, queues).sample()
