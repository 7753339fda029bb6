"""The dashboard's memory: queue samples of the last 15 minutes, and the task ids it has seen.

A background thread asks the broker for the status of the app's queues every
few seconds (:class:`~mqtasks.status.StatusMonitor`, which also gives the
rates) and keeps the samples in a ring buffer; the queues page draws its live
charts from them. The same thread notes the ids of tasks that heartbeats show
running, for the tasks page's "recent" list.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import structlog

from .._url import redact
from ..exceptions import MQTasksError
from ..status import QueueStatus, StatusMonitor

if TYPE_CHECKING:
    from ..app import App

__all__ = ["CHART_SPAN", "DEFAULT_SAMPLE_INTERVAL", "QueueSampler", "RecentTasks"]

logger = structlog.get_logger("mqtasks.dashboard")

#: Seconds between two samples of the queues.
DEFAULT_SAMPLE_INTERVAL = 2.0
#: Seconds of samples the charts show.
CHART_SPAN = 15 * 60.0


class RecentTasks:
    """The last task ids the dashboard has seen, newest first, with their task names."""

    def __init__(self, size: int = 50) -> None:
        self._size = size
        self._ids: OrderedDict[str, str | None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, task_id: str, task: str | None = None) -> None:
        """Note ``task_id`` as seen now (again)."""
        if not task_id:
            return
        with self._lock:
            known = self._ids.pop(task_id, None)
            self._ids[task_id] = task or known
            while len(self._ids) > self._size:
                self._ids.popitem(last=False)

    def items(self) -> list[tuple[str, str | None]]:
        """Return ``(task id, task name)`` pairs, the most recently seen first."""
        with self._lock:
            return list(reversed(self._ids.items()))


class QueueSampler:
    """Samples the app's queues on a background thread into a ring buffer.

    Args:
        app: The app whose broker to ask.
        lock: Held around each broker call (the dashboard shares the app's transport).
        interval: Seconds between samples.
        span: Seconds of samples kept.
        on_sample: Called after each sample (in the sampling thread), errors logged.
    """

    def __init__(
        self,
        app: App,
        lock: threading.Lock,
        *,
        interval: float = DEFAULT_SAMPLE_INTERVAL,
        span: float = CHART_SPAN,
        on_sample: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.interval = interval
        self._lock = lock
        self._monitor = StatusMonitor(app)
        self._samples: deque[tuple[float, list[QueueStatus]]] = deque(
            maxlen=max(2, int(span / interval) + 1)
        )
        self._error: str | None = None
        self._on_sample = on_sample
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()

    @property
    def queues(self) -> list[str]:
        """The queues sampled, in order."""
        return [spec.name for spec in self._monitor.specs]

    def start(self) -> None:
        """Take a first sample now, then keep sampling in a daemon thread."""
        self.sample()
        self._thread = threading.Thread(
            target=self._run, name="mqtasks-dashboard-sampler", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Ask the broker now; a failure is kept (masked) for the page to show."""
        try:
            with self._lock:
                statuses = self._monitor.sample()
        except MQTasksError as exc:
            with self._state_lock:
                self._error = redact(str(exc))
            logger.warning("dashboard.sample_failed", error=self._error)
        else:
            with self._state_lock:
                self._samples.append((time.time(), statuses))
                self._error = None
        if self._on_sample is not None:
            try:
                self._on_sample()
            except Exception as exc:  # a side task must not stop the sampling
                logger.warning("dashboard.side_sample_failed", error=redact(repr(exc)))

    def latest(self) -> tuple[list[QueueStatus], str | None]:
        """Return the last sample (empty before the first) and the last error, if any."""
        with self._state_lock:
            statuses = self._samples[-1][1] if self._samples else []
            return statuses, self._error

    def history(self) -> dict[str, Any]:
        """Return the kept samples as chart series: times and, per queue, counts over time."""
        with self._state_lock:
            samples = list(self._samples)
        series: dict[str, dict[str, list[int | None]]] = {
            name: {"ready": [], "unacked": [], "dead": []} for name in self.queues
        }
        for _, statuses in samples:
            by_name = {s.queue: s for s in statuses}
            for name, lines in series.items():
                s = by_name.get(name)
                lines["ready"].append(s.ready if s else None)
                lines["unacked"].append(s.unacked if s else None)
                lines["dead"].append(s.dead_lettered if s else None)
        return {"t": [round(at, 3) for at, _ in samples], "series": series}


def note_active(recent: RecentTasks, active: Iterable[dict[str, Any]]) -> None:
    """Note the tasks of heartbeats' ``active`` lists as recently seen."""
    for entry in active:
        task_id = entry.get("id") or entry.get("task_id")
        if isinstance(task_id, str):
            name = entry.get("task") or entry.get("name")
            recent.add(task_id, name if isinstance(name, str) else None)
