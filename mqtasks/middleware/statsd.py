"""StatsdMetrics: task counters and timers, worker and queue gauges, sent to StatsD over UDP.

Metric names share their stems with the log events (``task.retried`` is logged
and counted as ``<prefix>.task.retried.<task>``); the full table is in the
observability guide. Sending never blocks and never fails a task: the socket
is non-blocking UDP, and errors are dropped, logged at most once a minute.
"""

from __future__ import annotations

import atexit
import os
import re
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import statsd
import structlog

from ..exceptions import ConfigurationError, QueueNotFound, SkipMessage, TaskControl
from ..transport.base import dead_letter_spec
from .base import Middleware

if TYPE_CHECKING:
    from ..app import App
    from ..config import Settings
    from ..message import Message
    from ..worker import Worker

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_PREFIX",
    "DEFAULT_URL",
    "ERROR_LOG_INTERVAL",
    "UNKNOWN_TASK",
    "StatsdMetrics",
    "parse_statsd_url",
    "sanitize",
]

logger = structlog.get_logger("mqtasks.middleware.statsd")

#: Where metrics go when a StatsdMetrics is made without a URL.
DEFAULT_URL = "statsd://localhost:8125/mqtasks"
#: Port used when a ``statsd://`` URL names none.
DEFAULT_PORT = 8125
#: Prefix of every metric when a ``statsd://`` URL has no path.
DEFAULT_PREFIX = "mqtasks"
#: Name used for a task this app has not registered (bad input, or a typo in a publish).
UNKNOWN_TASK = "_unknown"
#: Seconds between two log events about failed sends (or failed gauge samples).
ERROR_LOG_INTERVAL = 60.0
#: Most task names whose sanitised form is cached.
_NAME_CACHE_SIZE = 1024

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def sanitize(name: str) -> str:
    """Return ``name`` as one StatsD path segment: anything but ``[A-Za-z0-9_-]`` becomes ``_``.

    Dots go too, so ``shop.send_email`` stays one segment (``shop_send_email``)
    instead of nesting in Graphite.
    """
    return _UNSAFE.sub("_", name) or "_"


def parse_statsd_url(url: str) -> tuple[str, int, str]:
    """Split ``statsd://host:port/prefix`` into host, port and prefix.

    The port defaults to :data:`DEFAULT_PORT` and the prefix to
    :data:`DEFAULT_PREFIX`; slashes in the path become dots.

    Raises:
        ConfigurationError: Not a ``statsd://`` URL, no host, a bad port or prefix.
    """
    example = "statsd://localhost:8125/mqtasks"
    parts = urlsplit(url)
    if parts.scheme != "statsd":
        raise ConfigurationError(f"StatsD URL {url!r} must start with statsd://, as in {example}.")
    if not parts.hostname:
        raise ConfigurationError(f"StatsD URL {url!r} names no host, as in {example}.")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ConfigurationError(f"StatsD URL {url!r} has an invalid port.") from None
    prefix = parts.path.strip("/").replace("/", ".") or DEFAULT_PREFIX
    if not _PREFIX.match(prefix):
        raise ConfigurationError(
            f"StatsD prefix {prefix!r} (from {url!r}) may hold only letters, digits, '_', '-' and dots."
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigurationError(f"StatsD URL {url!r} takes no user, query or fragment.")
    return parts.hostname, port, prefix


class _ErrorLog:
    """Logs an error at most once per ``ERROR_LOG_INTERVAL``, counting the ones it skipped."""

    def __init__(self, event: str) -> None:
        self.event = event
        self.suppressed = 0
        self.last = -ERROR_LOG_INTERVAL

    def __call__(self, exc: BaseException, **fields: Any) -> None:
        now = time.monotonic()
        if now - self.last < ERROR_LOG_INTERVAL:
            self.suppressed += 1
            return
        suppressed, self.suppressed, self.last = self.suppressed, 0, now
        logger.warning(
            self.event,
            error=f"{type(exc).__name__}: {exc}",
            suppressed=suppressed,
            note=f"logged at most every {ERROR_LOG_INTERVAL:.0f} s; tasks are not affected",
            **fields,
        )


class _UdpClient(statsd.StatsClient):  # type: ignore[misc]  # statsd is untyped
    """statsd's UDP client on a non-blocking socket that reports failed sends."""

    def __init__(self, host: str, port: int, prefix: str, maxudpsize: int, errors: _ErrorLog):
        super().__init__(host, port, prefix=prefix, maxudpsize=maxudpsize, ipv6=":" in host)
        self._sock.setblocking(False)  # a full send buffer drops a packet instead of waiting
        self._errors = errors

    def _send(self, data: str) -> None:
        # statsd's own _send drops errors silently; this one reports them (rate-limited).
        sock = self._sock
        if sock is None:  # closed; a stat added to its buffer afterwards is dropped
            return
        try:
            sock.sendto(data.encode("ascii"), self._addr)
        except Exception as exc:
            self._errors(exc)


class StatsdMetrics(Middleware):
    """Sends task counters and timers, and worker and queue gauges, to StatsD.

    Installed by the default stack when the ``statsd_url`` setting
    (``MQTASKS_STATSD_URL``) is set.

    Args:
        url: ``statsd://host:port/prefix``; port 8125 and prefix ``mqtasks`` by default.
        gauge_interval: Seconds between two samples of the worker's gauges.
        flush_interval: Seconds between two sends of the buffered stats.
        worker_name: This worker's segment in ``worker.*`` gauge names; the
            host name (plus ``_<slot>`` under ``mqtasks worker --processes``) by default.
        max_udp_size: Largest datagram sent; stats sent together are split to fit.

    Raises:
        ConfigurationError: A bad URL, or an interval that is not positive.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        gauge_interval: float = 5.0,
        flush_interval: float = 0.5,
        worker_name: str | None = None,
        max_udp_size: int = 512,
    ) -> None:
        if not gauge_interval > 0 or not flush_interval > 0:
            raise ConfigurationError(
                "gauge_interval and flush_interval must be positive seconds, "
                f"not {gauge_interval!r} and {flush_interval!r}."
            )
        self.host, self.port, self.prefix = parse_statsd_url(url)
        self.gauge_interval = float(gauge_interval)
        self.flush_interval = float(flush_interval)
        if worker_name is None:
            slot = os.environ.get("MQTASKS_WORKER_SLOT")
            worker_name = socket.gethostname() + (f"_{slot}" if slot else "")
        #: This worker's segment in ``worker.*`` gauge names.
        self.worker_name = sanitize(worker_name)
        self.max_udp_size = max_udp_size
        self._send_errors = _ErrorLog("statsd.send_failed")
        self._sample_errors = _ErrorLog("statsd.gauge_sample_failed")
        self._client: _UdpClient | None = None
        self._buffer: Any = None
        self._closer: weakref.finalize[Any, Any] | None = None
        self._stop = threading.Event()
        self._resolved_at = -ERROR_LOG_INTERVAL
        self._lock = threading.Lock()
        # Held while the buffer is sent and while the client is closed, so that
        # nothing is ever sent through a closed socket.
        self._send_lock = threading.Lock()
        self._local = threading.local()
        self._names: dict[str, str] = {}
        self._samplers: dict[int, threading.Event] = {}
        _LIVE.add(self)
        # The socket and the flush thread start with the first stat, not here:
        # an app built in a process that then forks workers (mqtasks worker
        # --processes) must hold no thread or socket, and each child gets its own.

    @classmethod
    def from_settings(cls, settings: Settings) -> StatsdMetrics | None:
        """Return metrics to the settings' ``statsd_url``, or None when it is unset."""
        return None if settings.statsd_url is None else cls(settings.statsd_url)

    def __repr__(self) -> str:
        return f"<StatsdMetrics statsd://{self.host}:{self.port}/{self.prefix}>"

    # -- sending ------------------------------------------------------------------
    #
    # Stats are buffered (a statsd Pipeline: a deque, safe to append to from any
    # thread) and sent by a background thread every flush_interval, packed into
    # datagrams of up to max_udp_size. A worker thread that called sendto()
    # itself would give up the GIL for the system call and then wait for it
    # behind the other worker threads, at every task: in the benchmark that
    # cost more than all of the formatting.

    def _connect(self) -> Any:
        # Resolving the host can fail (or name a host that is gone); try again
        # at most once per ERROR_LOG_INTERVAL, dropping stats meanwhile.
        with self._lock:
            if (
                self._client is None
                and not _exiting.is_set()
                and time.monotonic() - self._resolved_at >= ERROR_LOG_INTERVAL
            ):
                self._resolved_at = time.monotonic()
                try:
                    client = _UdpClient(
                        self.host, self.port, self.prefix, self.max_udp_size, self._send_errors
                    )
                except OSError as exc:
                    self._send_errors(exc, host=self.host, port=self.port)
                else:
                    buffer = client.pipeline()
                    # Send what is left and close the socket when this middleware
                    # is dropped (apps are seldom closed). Not at exit: weakref's
                    # exit hook runs before _close_all (atexit runs the last
                    # registered first) and would close the socket before the
                    # final send; _close_all sends, then closes.
                    closer = weakref.finalize(self, _send_and_close, buffer, client)
                    closer.atexit = False
                    self._client, self._buffer, self._closer = client, buffer, closer
                    self._stop = stop = threading.Event()
                    threading.Thread(
                        target=_flush_loop,
                        args=(weakref.ref(self), self.flush_interval, stop),
                        name="mqtasks-statsd-flush",
                        daemon=True,
                    ).start()
            return self._buffer

    def flush(self) -> None:
        """Send the buffered stats now (the background thread does it every ``flush_interval``)."""
        with self._send_lock:
            buffer = self._buffer  # None once closed: its client is closed too
            if buffer is not None:
                try:
                    buffer.send()
                except Exception as exc:  # sending must never raise
                    self._send_errors(exc)

    def close(self) -> None:
        """Send what is buffered and close the UDP socket; later stats open a new one."""
        with self._send_lock:
            with self._lock:
                client, buffer, closer = self._client, self._buffer, self._closer
                self._client = self._buffer = self._closer = None
                self._resolved_at = -ERROR_LOG_INTERVAL
                self._stop.set()
            if closer is not None:
                # Not closer(): weakref ignores finalizers once its exit hook has run.
                closer.detach()
            if client is not None:
                _send_and_close(buffer, client)

    @property
    def client(self) -> Any:
        """The :class:`statsd.StatsClient` (prefix applied), or None while the host is unresolved.

        What it sends goes out at once, not through the buffer.
        """
        if self._client is None:
            self._connect()
        return self._client

    def _stats(self) -> Any:
        buffer = self._buffer
        return buffer if buffer is not None else self._connect()

    def incr(self, stat: str, count: int = 1) -> None:
        """Add ``count`` to counter ``stat`` (under the prefix); never raises."""
        buffer = self._stats()
        if buffer is not None:
            buffer.incr(stat, count)

    def timing(self, stat: str, ms: float) -> None:
        """Record a timing of ``ms`` milliseconds for timer ``stat``; never raises."""
        buffer = self._stats()
        if buffer is not None:
            buffer.timing(stat, ms)

    def gauge(self, stat: str, value: float) -> None:
        """Set gauge ``stat`` to ``value``; never raises."""
        buffer = self._stats()
        if buffer is not None:
            buffer.gauge(stat, value)

    def task_name(self, app: App, task: str | None) -> str:
        """Return ``task`` sanitised for a metric name; :data:`UNKNOWN_TASK` if not registered.

        Only registered names are used, so a flood of bad messages cannot
        create a metric per made-up name.
        """
        if task is None:
            return UNKNOWN_TASK
        name = self._names.get(task)
        if name is None:
            if task not in app.tasks:
                return UNKNOWN_TASK
            name = sanitize(task)
            if len(self._names) < _NAME_CACHE_SIZE:
                self._names[task] = name
        return name

    # -- publishing ------------------------------------------------------------------

    def after_publish(self, app: App, message: Message) -> None:
        """Count ``task.published``."""
        self.incr("task.published." + self.task_name(app, message.task))

    # -- processing ------------------------------------------------------------------

    def before_process(self, worker: Worker, message: Message) -> None:
        """Count ``task.received`` (and ``task.redelivered``); time the first attempt's wait."""
        local = self._local
        local.started = time.perf_counter()
        stats = self._stats()
        if stats is None:
            return
        local.name = name = self.task_name(worker.app, message.task)
        local.processing = True
        stats.incr("task.received." + name)
        if message.redelivered:
            stats.incr("task.redelivered." + name)
        published_at = message.published_at
        if message.attempt == 1 and published_at is not None:
            waited = time.time() - published_at.timestamp()
            stats.timing("task.queue_time." + name, max(0.0, waited) * 1000)

    def after_retry(
        self, worker: Worker, message: Message, delay: float, exception: BaseException
    ) -> None:
        """Count ``task.retried``."""
        self.incr("task.retried." + self.task_name(worker.app, message.task))

    def after_reject(self, worker: Worker, message: Message | None, reason: str) -> None:
        """Count ``task.rejected``."""
        task = message.task if message is not None else None
        self.incr("task.rejected." + self.task_name(worker.app, task))

    def after_dead_letter(self, worker: Worker, message: Message | None, reason: str) -> None:
        """Count ``task.dead_lettered``."""
        task = message.task if message is not None else None
        self.incr("task.dead_lettered." + self.task_name(worker.app, task))

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Count ``task.succeeded`` or ``task.failed``; time the run and, on success, end to end."""
        local = self._local
        if not getattr(local, "processing", False):
            return
        local.processing = False
        stats = self._stats()
        if stats is None or isinstance(exception, SkipMessage):
            return
        name = local.name
        stats.timing("task.run_time." + name, (time.perf_counter() - local.started) * 1000)
        if exception is None:
            stats.incr("task.succeeded." + name)
            published_at = message.published_at
            if published_at is not None:
                total = time.time() - published_at.timestamp()
                stats.timing("task.end_to_end." + name, max(0.0, total) * 1000)
        elif not isinstance(exception, TaskControl):
            stats.incr("task.failed." + name)

    # -- gauges ------------------------------------------------------------------------

    def worker_boot(self, worker: Worker) -> None:
        """Start sampling the worker's gauges every ``gauge_interval`` seconds."""
        stop = threading.Event()
        self._samplers[id(worker)] = stop
        thread = threading.Thread(
            target=self._sample_loop, args=(worker, stop), name="mqtasks-statsd-gauges", daemon=True
        )
        thread.start()

    def worker_shutdown(self, worker: Worker) -> None:
        """Stop sampling the worker's gauges."""
        stop = self._samplers.pop(id(worker), None)
        if stop is not None:
            stop.set()

    def _sample_loop(self, worker: Worker, stop: threading.Event) -> None:
        while True:
            try:
                self.sample(worker)
            except Exception as exc:  # a gauge must never take anything down
                self._sample_errors(exc)
            if stop.wait(self.gauge_interval) or worker.join(0):
                return

    def sample(self, worker: Worker) -> None:
        """Record the gauges once: tasks running in ``worker``, ready and dead-lettered
        messages of each queue it consumes."""
        pipe = self._stats()
        if pipe is None:
            return
        pipe.gauge(f"worker.in_flight.{self.worker_name}", worker.running)
        app = worker.app
        specs = []
        for queue in worker.queues:
            spec = app.queue(queue)
            specs += [(f"queue.depth.{sanitize(queue)}", spec)]
            specs += [(f"queue.dead_letters.{sanitize(queue)}", dead_letter_spec(spec))]
        transport = app.transport
        try:
            counts = transport.message_counts([s for _, s in specs])
        except QueueNotFound:  # one of them is not declared yet: count the others one by one
            counts = {}
            for _, spec in specs:
                try:
                    counts.update(transport.message_counts([spec]))
                except QueueNotFound:
                    continue
        for stat, spec in specs:
            if spec.name in counts:
                pipe.gauge(stat, counts[spec.name])


#: Every StatsdMetrics alive, flushed and closed when the interpreter exits.
_LIVE: weakref.WeakSet[StatsdMetrics] = weakref.WeakSet()


def _flush_loop(ref: weakref.ref[StatsdMetrics], interval: float, stop: threading.Event) -> None:
    # Holds the middleware only while flushing, so that it can be collected.
    while not stop.wait(interval):
        metrics = ref()
        if metrics is None:
            return
        metrics.flush()
        del metrics


#: Set once the interpreter exits: stats after that are dropped, no socket is opened again.
_exiting = threading.Event()


def _send_and_close(buffer: Any, client: _UdpClient) -> None:
    """Send what ``buffer`` holds through ``client``, then close ``client``."""
    try:
        buffer.send()
    except Exception as exc:  # sending must never raise
        client._errors(exc)
    client.close()


@atexit.register
def _close_all() -> None:
    # A producer's last stats (its final task.published counts) are still in the
    # buffer when it exits: send them, then close each socket, in that order.
    _exiting.set()
    for metrics in list(_LIVE):
        metrics.close()
