"""Structured logging: how ``mqtasks worker`` sets up structlog, and its URL-masking processor.

Every log line is one event with a stable name (``task.succeeded``) and fields.
Inside a worker, the :class:`~mqtasks.middleware.log_context.StructlogContext`
middleware binds ``task_id``, ``task_name``, ``attempt``, ``queue`` (and
``trace_id``) with :mod:`structlog.contextvars` for each message, so the
:func:`~structlog.contextvars.merge_contextvars` processor installed here adds
them to every event logged while the task runs, the task's own included.
"""

from __future__ import annotations

import atexit
import collections
import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from ._url import redact
from .exceptions import ConfigurationError

__all__ = [
    "FLUSH_INTERVAL",
    "LOG_LEVELS",
    "LineWriter",
    "configure_logging",
    "flush",
    "mask_urls",
    "resolve_format",
]

#: Log levels ``configure_logging`` accepts.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: Seconds between two writes of the buffered log lines.
FLUSH_INTERVAL = 0.1

# Marks the stdlib handler configure_logging installed, so a second call replaces it.
_HANDLER_NAME = "mqtasks"


def mask_urls(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Processor: mask every password in string values (``amqp://u:**@h``).

    URL passwords and the broker passwords mqtasks knows are masked, in the
    event's fields and in its formatted traceback (it runs after
    ``format_exc_info``). A last line of defence: mqtasks logs broker URLs
    masked already, but an application may pass one to a log call.
    """
    for key, value in event_dict.items():
        if type(value) is str:
            event_dict[key] = redact(value)
    return event_dict


class LineWriter:
    """Buffers rendered log lines and writes them to ``stream`` from a background thread.

    A worker thread that wrote each line itself would give up the GIL for the
    ``write`` system call and then wait for it behind the other worker threads,
    at every event: under load that costs more than rendering the line. Here a
    line is appended to a deque; a thread writes what has gathered every
    ``interval`` seconds, and at exit. Past ``max_lines`` waiting, the writer
    of a line writes them all itself (back-pressure instead of unbounded memory).

    Args:
        stream: Where the lines go.
        interval: Seconds between two writes.
        max_lines: Most lines held before a caller writes them out.
    """

    def __init__(self, stream: TextIO, interval: float = FLUSH_INTERVAL, max_lines: int = 10_000):
        self.stream = stream
        self.interval = interval
        self.max_lines = max_lines
        self._lines: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqtasks-log-writer", daemon=True)
        if interval > 0:
            self._thread.start()
        else:  # no thread (a process that forks must have none): each line is written at once
            self.max_lines = 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.drain()

    def write(self, text: str) -> int:
        """Queue ``text`` (one or more whole lines) for writing."""
        self._lines.append(text)
        if len(self._lines) > self.max_lines:
            self.drain()
        return len(text)

    def flush(self) -> None:
        """Do nothing: lines are written by the background thread (see :meth:`drain`)."""

    def drain(self) -> None:
        """Write every queued line to the stream now, and flush it."""
        with self._lock:
            parts = []
            pop = self._lines.popleft
            while True:
                try:
                    parts.append(pop())
                except IndexError:
                    break
            if parts:
                try:
                    self.stream.write("".join(parts))
                    self.stream.flush()
                except (OSError, ValueError):  # a closed or broken stream: nowhere to log
                    pass

    def close(self) -> None:
        """Stop the background thread and write what is left."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.drain()

    def isatty(self) -> bool:
        """Whether the stream is a terminal."""
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty is not None and isatty())


class _LineLogger:
    """The structlog logger :func:`configure_logging` installs: a rendered event is a line."""

    def __init__(self, writer: LineWriter) -> None:
        self._write = writer.write

    def msg(self, message: str) -> None:
        self._write(message + "\n")

    log = debug = info = warn = warning = msg
    error = critical = exception = fatal = failure = err = msg


_writer: LineWriter | None = None


def flush() -> None:
    """Write the log lines still buffered by :func:`configure_logging`'s writer, now."""
    if _writer is not None:
        _writer.drain()


atexit.register(flush)


def resolve_format(fmt: str, stream: TextIO | None = None) -> str:
    """Return ``"console"`` or ``"json"`` for ``fmt`` (``auto``: console on a terminal).

    Raises:
        ConfigurationError: ``fmt`` is not ``auto``, ``console`` or ``json``.
    """
    if fmt == "auto":
        target = sys.stderr if stream is None else stream
        isatty = getattr(target, "isatty", None)
        return "console" if isatty is not None and isatty() else "json"
    if fmt not in ("console", "json"):
        raise ConfigurationError(f"Unknown log format {fmt!r}: use auto, console or json.")
    return fmt


def configure_logging(
    level: str = "info", fmt: str = "auto", *, stream: TextIO | None = None, background: bool = True
) -> str:
    """Set up structlog, and stdlib logging (kombu's), to write events to ``stream``.

    Events get the task context bound with :mod:`structlog.contextvars`, a log
    level, an ISO UTC timestamp and masked URLs. Records of stdlib loggers
    (warnings and above) are rendered the same way, so a JSON log holds only JSON.
    Lines are written by a background thread within :data:`FLUSH_INTERVAL`
    seconds (see :class:`LineWriter`), and at exit; call :func:`flush` before
    ``os._exit``.

    Args:
        level: The lowest level logged: one of :data:`LOG_LEVELS`.
        fmt: ``json`` (one object per line), ``console`` (readable), or ``auto``:
            console if ``stream`` is a terminal, JSON otherwise.
        stream: Where to write; standard error by default.
        background: Write from a background thread; False writes each line at
            once, with no thread (a process that forks, the ``--processes`` supervisor).

    Returns:
        The format used, ``"console"`` or ``"json"``.

    Raises:
        ConfigurationError: An unknown level or format.
    """
    if level.lower() not in LOG_LEVELS:
        raise ConfigurationError(
            f"Unknown log level {level!r}: use one of {', '.join(LOG_LEVELS)}."
        )
    numeric = logging.getLevelName(level.upper())
    out = sys.stderr if stream is None else stream
    fmt = resolve_format(fmt, out)
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        isatty = getattr(out, "isatty", None)
        # Plain tracebacks: rich's show the frames' local variables, broker URLs included.
        renderer = structlog.dev.ConsoleRenderer(
            colors=isatty is not None and isatty(),
            exception_formatter=structlog.dev.plain_traceback,
        )
    # Tracebacks are formatted to text first, so that mask_urls masks them too.
    tail: list[Any] = [structlog.processors.format_exc_info, mask_urls, renderer]
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    global _writer
    interval = FLUSH_INTERVAL if background else 0.0
    if _writer is None or _writer.stream is not out or _writer.interval != interval:
        if _writer is not None:
            _writer.close()
        _writer = LineWriter(out, interval)
    # Loggers used before a reconfiguration keep their writer: reuse it for the same stream.
    writer = _writer
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *args: _LineLogger(writer),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(writer)  # type: ignore[arg-type]  # a text stream enough
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                stamp,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    # kombu and py-amqp are chatty at info level: their warnings and errors are enough.
    root.setLevel(max(numeric, logging.WARNING))
    return fmt
