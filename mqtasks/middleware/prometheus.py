"""PrometheusMetrics: the StatsD metrics (counters, timers as histograms, gauges) for scraping.

The names share their stems with :mod:`mqtasks.middleware.statsd` and the log
events (``task.retried`` is ``mqtasks_task_retried_total{task="..."}`` here);
the table is in the metrics guide. ``prometheus-client`` is an optional extra
(``pip install "mqtasks[prometheus]"``), imported by this module only.

Under ``mqtasks worker --processes N`` each child writes its values to files in
the directory ``PROMETHEUS_MULTIPROC_DIR`` names (prometheus_client's
multiprocess mode), and the supervisor serves their sum through
:class:`SupervisorMetrics`.
"""

from __future__ import annotations

import atexit
import bisect
import math
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog

from ..exceptions import ConfigurationError, QueueNotFound, SkipMessage, TaskControl
from ..transport.base import dead_letter_spec
from .base import Middleware
from .statsd import UNKNOWN_TASK

try:
    import prometheus_client
    from prometheus_client import values
except ImportError:  # the extra is not installed: PrometheusMetrics() says how to get it
    prometheus_client = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from ..app import App
    from ..message import Message
    from ..worker import Worker

__all__ = [
    "DEFAULT_NAMESPACE",
    "FLUSH_INTERVAL",
    "MULTIPROC_DIR_ENV",
    "RUN_TIME_BUCKETS",
    "UNKNOWN_TASK",
    "WAIT_BUCKETS",
    "MetricFamilies",
    "MetricsServer",
    "PrometheusMetrics",
    "SupervisorMetrics",
    "TaskMetrics",
    "exposition_registry",
    "metrics_asgi_app",
    "serve_metrics",
]

logger = structlog.get_logger("mqtasks.middleware.prometheus")

#: What every metric name starts with.
DEFAULT_NAMESPACE = "mqtasks"
#: The environment variable that turns on prometheus_client's multiprocess mode.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Histogram buckets of ``task_run_time_seconds``: a millisecond to five minutes.
RUN_TIME_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
#: Histogram buckets of ``task_queue_time_seconds`` and ``task_end_to_end_seconds``:
#: waits run longer than tasks (a backlog, a countdown, retries): 5 ms to an hour.
WAIT_BUCKETS = (*RUN_TIME_BUCKETS[2:15], 300.0, 900.0, 3600.0)

_INSTALL_HINT = 'Prometheus metrics need prometheus-client: pip install "mqtasks[prometheus]"'

#: The counters of a task, as (StatsD stem, help text).
_COUNTERS = {
    "published": "Messages the broker confirmed.",
    "received": "Attempts a worker started.",
    "redelivered": "Attempts of messages the broker delivered before.",
    "succeeded": "Attempts that returned.",
    "failed": "Attempts that raised (Retry and Reject excepted).",
    "retried": "Next attempts published (after a failure or a Retry).",
    "dead_lettered": "Messages stored in their dead-letter queue, whatever the reason.",
    "rejected": "Messages rejected as bad input or by the task (Reject).",
}
#: The timers of a task (histograms of seconds), as (StatsD stem, help text).
_TIMERS = {
    "run_time": "Seconds from the start of an attempt to its end.",
    "queue_time": "Seconds from publishing to the start of the first attempt.",
    "end_to_end": "Seconds from publishing to success, retries included.",
}
#: The gauges, as name: (help text, labels).
_GAUGES = {
    "worker_in_flight": ("Tasks running in the worker (all its processes).", ()),
    "queue_depth": ("Ready messages of each queue the worker consumes.", ("queue",)),
    "queue_dead_letters": ("Messages in the queue's dead-letter queue.", ("queue",)),
}


def _require() -> None:
    if prometheus_client is None:
        raise ConfigurationError(_INSTALL_HINT + ".")


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode, or None when it is off."""
    return os.environ.get(MULTIPROC_DIR_ENV) or None


class TaskMetrics(NamedTuple):
    """The metrics of one task: its labelled counters and histograms.

    Looked up once per task name and kept (``labels()`` takes a lock and hashes).
    """

    published: Any
    received: Any
    redelivered: Any
    succeeded: Any
    failed: Any
    retried: Any
    dead_lettered: Any
    rejected: Any
    run_time: Any
    queue_time: Any
    end_to_end: Any

    def labelled(self, name: str) -> TaskMetrics:
        """The children of these families for task ``name``."""
        return TaskMetrics._make(family.labels(name) for family in self)


class MetricFamilies:
    """Every metric family of one namespace in one registry (a name registers only once).

    Attributes:
        counters: The task counters, by StatsD stem (``"published"``...).
        run_time: The ``task_run_time_seconds`` histogram; ``queue_time`` and
            ``end_to_end`` likewise.
        in_flight: The ``worker_in_flight`` gauge; ``depth`` and ``dead_letters``
            are the ``queue_depth`` and ``queue_dead_letters`` gauges.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        namespace: str,
        run_time_buckets: Sequence[float],
        wait_buckets: Sequence[float],
    ) -> None:
        p = prometheus_client
        where: dict[str, Any] = {"namespace": namespace, "registry": registry}
        self.counters = {
            stem: p.Counter(f"task_{stem}", text, ["task"], **where)
            for stem, text in _COUNTERS.items()
        }
        buckets = {"run_time": run_time_buckets}
        self.run_time, self.queue_time, self.end_to_end = (
            p.Histogram(
                f"task_{s}_seconds", text, ["task"], buckets=buckets.get(s, wait_buckets), **where
            )
            for s, text in _TIMERS.items()
        )
        # Under --processes: the in-flight tasks of the live children add up; every
        # child samples the same queues, so the latest sample is the one to show.
        modes: dict[str, Any] = {"worker_in_flight": "livesum"}
        self.in_flight, self.depth, self.dead_letters = (
            p.Gauge(
                name, text, labels, multiprocess_mode=modes.get(name, "livemostrecent"), **where
            )
            for name, (text, labels) in _GAUGES.items()
        )

    def task(self, name: str) -> TaskMetrics:
        """The metrics labelled with task ``name``."""
        c = self.counters
        timers = (self.run_time, self.queue_time, self.end_to_end)
        return TaskMetrics._make([*(c[stem] for stem in _COUNTERS), *timers]).labelled(name)


#: Families made so far, by registry and namespace.
_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, MetricFamilies]] = (
    weakref.WeakKeyDictionary()
)
_FAMILIES_LOCK = threading.Lock()


def _families(
    registry: CollectorRegistry,
    namespace: str,
    run_time_buckets: Sequence[float],
    wait_buckets: Sequence[float],
) -> MetricFamilies:
    with _FAMILIES_LOCK:
        made = _FAMILIES.setdefault(registry, {})
        families = made.get(namespace)
        if families is None:
            if multiprocess_dir() and not getattr(values.ValueClass, "_multiprocess", False):
                # prometheus_client picks where values live when it is first imported;
                # an app imported before the directory was set would keep them in this
                # process, out of the supervisor's sight.
                values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
            if not made:
                registry.register(_FlushOnCollect(registry))
            families = MetricFamilies(registry, namespace, run_time_buckets, wait_buckets)
            made[namespace] = families
        return families


#: Seconds a worker thread keeps its counts and timings before writing them to the metrics.
FLUSH_INTERVAL = 1.0


class _Tally:
    """What one thread counted and timed since it last wrote to the metrics.

    Writing to a prometheus_client metric takes a lock and, under --processes,
    a write to a memory-mapped file: for a no-op task that was several times
    the cost of these dictionary updates. So the thread that runs a task only
    notes its counts and timings here, under a lock of its own that nothing
    else holds but a flush, and they reach the metrics once per
    FLUSH_INTERVAL, in one write per series and histogram bucket.
    """

    __slots__ = ("counts", "due", "lock", "observed", "thread")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[Any, int] = {}
        self.observed: dict[Any, list[float]] = {}
        self.due = time.perf_counter() + FLUSH_INTERVAL
        self.thread = threading.current_thread()

    def add(self, counter: Any) -> None:
        """Note one more for ``counter`` (the caller holds the lock)."""
        self.counts[counter] = self.counts.get(counter, 0) + 1

    def take(self) -> tuple[dict[Any, int], dict[Any, list[float]]]:
        """Return what is noted and start afresh."""
        with self.lock:
            taken = self.counts, self.observed
            self.counts, self.observed = {}, {}
            self.due = time.perf_counter() + FLUSH_INTERVAL
        return taken


def _write(counts: dict[Any, int], observed: dict[Any, list[float]]) -> None:
    """Add noted counts to their counters and timings to their histograms."""
    for counter, count in counts.items():
        counter.inc(count)
    for histogram, amounts in observed.items():
        bounds = getattr(histogram, "_upper_bounds", None)
        buckets = getattr(histogram, "_buckets", None)
        total = getattr(histogram, "_sum", None)
        if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
            for amount in amounts:  # a prometheus_client laid out otherwise: one at a time
                histogram.observe(amount)
            continue
        # What observe() does for each amount, once per bucket: the sum, and the
        # first bucket whose upper bound is >= the amount (buckets are stored apart,
        # made cumulative when collected).
        per_bucket = [0] * len(bounds)
        for amount in amounts:
            per_bucket[bisect.bisect_left(bounds, amount)] += 1
        total.inc(math.fsum(amounts))
        for bucket, count in zip(buckets, per_bucket, strict=True):
            if count:
                bucket.inc(count)


class _FlushOnCollect:
    """Registered first in a registry: a scrape first writes what every thread noted."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        for metrics in list(_LIVE):
            if metrics.registry is self.registry:
                metrics.flush()
        return []


class PrometheusMetrics(Middleware):
    """Records task counters, timers (as histograms) and worker and queue gauges for Prometheus.

    The same metrics as :class:`~mqtasks.middleware.statsd.StatsdMetrics`, with
    bounded labels only: ``task`` is a name the app registered (anything else is
    counted as :data:`~mqtasks.middleware.statsd.UNKNOWN_TASK`, so bad messages cannot create series) and
    ``queue`` a queue the worker consumes. Serve them with :func:`serve_metrics`
    (``mqtasks worker --metrics-port``) or :func:`metrics_asgi_app`.

    Args:
        registry: Where the metrics are registered; prometheus_client's default
            ``REGISTRY`` if None.
        namespace: What every metric name starts with.
        gauge_interval: Seconds between two samples of the worker's gauges.
        run_time_buckets: Upper bounds, in seconds, of the run-time histogram's buckets.
        wait_buckets: Upper bounds of the queue-time and end-to-end histograms' buckets.

    Raises:
        ConfigurationError: prometheus-client is not installed, or ``gauge_interval``
            is not positive.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        gauge_interval: float = 5.0,
        run_time_buckets: Sequence[float] = RUN_TIME_BUCKETS,
        wait_buckets: Sequence[float] = WAIT_BUCKETS,
    ) -> None:
        _require()
        if not gauge_interval > 0:
            raise ConfigurationError(
                f"gauge_interval must be positive seconds, not {gauge_interval!r}."
            )
        self.registry = prometheus_client.REGISTRY if registry is None else registry
        self.namespace = namespace
        self.gauge_interval = float(gauge_interval)
        self._buckets = (tuple(run_time_buckets), tuple(wait_buckets))
        self._families: MetricFamilies | None = None
        self._tasks: dict[str, TaskMetrics] = {}
        self._local = threading.local()
        self._tally_local = threading.local()
        self._tallies: list[_Tally] = []
        self._tallies_lock = threading.Lock()
        self._samplers: dict[int, threading.Event] = {}
        _LIVE.add(self)
        # The families are made with the first metric, not here: under --processes
        # the app is built before the supervisor forks, and each child's values
        # must go to its own files.

    def __repr__(self) -> str:
        return f"<PrometheusMetrics namespace={self.namespace!r}>"

    @property
    def families(self) -> MetricFamilies:
        """The metric families (made on first use)."""
        families = self._families
        if families is None:
            families = _families(self.registry, self.namespace, *self._buckets)
            self._families = families
        return families

    def task(self, app: App, task: str | None) -> TaskMetrics:
        """Return the labelled metrics of ``task``; those of :data:`~mqtasks.middleware.statsd.UNKNOWN_TASK` if not registered."""
        metrics = self._tasks.get(task) if task is not None else None
        if metrics is None:
            name = task if task is not None and task in app.tasks else UNKNOWN_TASK
            metrics = self._tasks.get(name)
            if metrics is None:
                metrics = self._tasks[name] = self.families.task(name)
        return metrics

    def _tally(self) -> _Tally:
        try:
            tally: _Tally = self._tally_local.tally
        except AttributeError:
            tally = self._tally_local.tally = _Tally()
            with self._tallies_lock:
                self._tallies.append(tally)
        return tally

    def _count(self, counter: Any) -> None:
        tally = self._tally()
        with tally.lock:
            tally.add(counter)
        if time.perf_counter() >= tally.due:
            _write(*tally.take())

    def flush(self) -> None:
        """Write what every thread has counted and timed to the metrics now.

        Each thread does it once per :data:`FLUSH_INTERVAL` while it works, a
        scrape of this process's registry first, and the gauge sampler every
        ``gauge_interval``; and when the worker stops or the process exits.
        """
        with self._tallies_lock:
            tallies = list(self._tallies)
            # Threads that ended leave nothing more to note once taken below.
            self._tallies[:] = [t for t in tallies if t.thread.is_alive()]
        for tally in tallies:
            _write(*tally.take())

    # -- publishing ------------------------------------------------------------------

    def after_publish(self, app: App, message: Message) -> None:
        """Count ``task_published``."""
        self._count(self.task(app, message.task).published)

    # -- processing ------------------------------------------------------------------

    def before_process(self, worker: Worker, message: Message) -> None:
        """Count ``task_received`` (and ``task_redelivered``); time the first attempt's wait."""
        local = self._local
        local.started = time.perf_counter()
        local.metrics = metrics = self.task(worker.app, message.task)
        tally = self._tally()
        published_at = message.published_at
        with tally.lock:
            tally.add(metrics.received)
            if message.redelivered:
                tally.add(metrics.redelivered)
            if message.attempt == 1 and published_at is not None:
                waited = max(0.0, time.time() - published_at.timestamp())
                tally.observed.setdefault(metrics.queue_time, []).append(waited)

    def after_retry(
        self, worker: Worker, message: Message, delay: float, exception: BaseException
    ) -> None:
        """Count ``task_retried``."""
        self._count(self.task(worker.app, message.task).retried)

    def after_reject(self, worker: Worker, message: Message | None, reason: str) -> None:
        """Count ``task_rejected``."""
        self._count(self.task(worker.app, message.task if message is not None else None).rejected)

    def after_dead_letter(self, worker: Worker, message: Message | None, reason: str) -> None:
        """Count ``task_dead_lettered``."""
        task = message.task if message is not None else None
        self._count(self.task(worker.app, task).dead_lettered)

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Count ``task_succeeded`` or ``task_failed``; time the run and, on success, end to end."""
        local = self._local
        metrics = getattr(local, "metrics", None)
        if metrics is None:
            return
        local.metrics = None
        if isinstance(exception, SkipMessage):
            return
        now = time.perf_counter()
        tally = self._tally()
        with tally.lock:
            observed = tally.observed
            observed.setdefault(metrics.run_time, []).append(now - local.started)
            if exception is None:
                tally.add(metrics.succeeded)
                published_at = message.published_at
                if published_at is not None:
                    total = max(0.0, time.time() - published_at.timestamp())
                    observed.setdefault(metrics.end_to_end, []).append(total)
            elif not isinstance(exception, TaskControl):
                tally.add(metrics.failed)
        if now >= tally.due:
            _write(*tally.take())

    # -- gauges ------------------------------------------------------------------------

    def worker_boot(self, worker: Worker) -> None:
        """Start sampling the worker's gauges every ``gauge_interval`` seconds."""
        self._samplers[id(worker)] = stop = threading.Event()
        threading.Thread(
            target=self._sample_loop,
            args=(worker, stop),
            name="mqtasks-prometheus-gauges",
            daemon=True,
        ).start()

    def worker_shutdown(self, worker: Worker) -> None:
        """Stop sampling the worker's gauges; the in-flight gauge goes back to 0."""
        stop = self._samplers.pop(id(worker), None)
        if stop is not None:
            stop.set()
            self.families.in_flight.set(0)
        self.flush()

    def _sample_loop(self, worker: Worker, stop: threading.Event) -> None:
        failures = 0
        while True:
            try:
                self.sample(worker)
            except Exception as exc:  # a gauge must never take anything down
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    logger.warning(
                        "prometheus.gauge_sample_failed",
                        error=f"{type(exc).__name__}: {exc}",
                        failures=failures,
                    )
            if stop.wait(self.gauge_interval) or worker.join(0):
                return

    def sample(self, worker: Worker) -> None:
        """Set the gauges once: tasks running in ``worker``, ready and dead-lettered
        messages of each queue it consumes; and :meth:`flush`."""
        self.flush()
        self.families.in_flight.set(worker.running)
        self.sample_queues(worker.app, worker.queues)

    def sample_queues(self, app: App, queues: Sequence[str]) -> None:
        """Set the ready and dead-lettered gauges of ``queues`` once.

        A worker does it every ``gauge_interval``; a process that runs no worker
        (the dashboard) calls it itself, with queues from its configuration
        (``app.task_queues()``), never from input: each is a label value.
        """
        families = self.families
        gauges = {}
        for queue in queues:
            spec = app.queue(queue)
            dead = dead_letter_spec(spec)
            gauges[spec.name] = (families.depth.labels(queue), spec)
            gauges[dead.name] = (families.dead_letters.labels(queue), dead)
        specs = [spec for _, spec in gauges.values()]
        transport = app.transport
        try:
            counts = transport.message_counts(specs)
        except QueueNotFound:  # one is not declared yet: ask for each on its own
            counts = {}
            for spec in specs:
                try:
                    counts.update(transport.message_counts([spec]))
                except QueueNotFound:
                    pass
        for name, count in counts.items():
            if name in gauges:
                gauges[name][0].set(count)


#: Every PrometheusMetrics alive: flushed by a scrape of their registry and at exit.
_LIVE: weakref.WeakSet[PrometheusMetrics] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    # A process's last second of counts (a child of --processes that stops, a
    # producer's last publishes) goes to the files the supervisor reads.
    for metrics in list(_LIVE):
        metrics.flush()


def _forget_in_child() -> None:
    # A forked child starts with a copy of what the parent's threads noted: the
    # parent writes that, the child must not write it again. (Locks are made
    # anew: another thread of the parent may have held one at the fork.)
    for metrics in list(_LIVE):
        metrics._tallies_lock = threading.Lock()
        for tally in metrics._tallies:
            tally.lock, tally.counts, tally.observed = threading.Lock(), {}, {}


os.register_at_fork(after_in_child=_forget_in_child)


# The serving side lives in its own module (this one would pass 600 lines); its
# names are this module's too. Imported last: it uses the names above.
from .prometheus_serve import (  # noqa: E402
    MetricsServer,
    SupervisorMetrics,
    exposition_registry,
    metrics_asgi_app,
    serve_metrics,
)
