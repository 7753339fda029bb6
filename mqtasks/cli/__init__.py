"""The ``mqtasks`` command line: ``mqtasks worker -A myapp``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import types
from typing import Any

import click
import structlog

from .. import __version__
from .. import logging as logs
from .._importing import import_object
from .._url import redact
from ..app import App
from ..config import mask_url
from ..dlq import DeadLetter, list_dead_letters, purge_dead_letters, replay_dead_letters
from ..exceptions import MQTasksError
from ..status import QueueStatus, StatusMonitor
from ..transport.base import dead_letter_spec
from ..worker import Worker

__all__ = ["RET_ERROR", "RET_FORCED", "RET_OK", "RET_TIMEOUT", "main"]

#: Exit code: stopped cleanly.
RET_OK = 0
#: Exit code: could not start (import, configuration or connection error).
RET_ERROR = 1
#: Exit code: the shutdown grace period ran out; unfinished tasks go back to the broker.
RET_TIMEOUT = 3
#: Exit code: a second signal forced an immediate exit.
RET_FORCED = 4

HELP_EPILOG = """\b
Examples:
  mqtasks worker -A myapp                 # the 'app' attribute of module myapp
  mqtasks worker -A myapp.tasks:app -Q emails,reports -c 16
  mqtasks worker -A myapp --processes 2   # two processes, each with 8 threads

\b
Exit codes:
  0  stopped cleanly (SIGTERM/SIGINT: running tasks finished)
  1  could not start: the broker is unreachable, or the app module raised
  2  bad command line, including -A naming no app and impossible settings
  3  shutdown grace period ran out; unfinished tasks were left to the broker
  4  a second SIGTERM/SIGINT forced an immediate exit
"""

logger = structlog.get_logger("mqtasks.cli")


def configure_logging(level: str, fmt: str) -> str:
    """Set up structured logging to stderr (see :func:`mqtasks.logging.configure_logging`).

    Returns the format used. Raises :exc:`click.UsageError` for an unknown level or
    format (``MQTASKS_LOG_FORMAT`` included).
    """
    try:
        return logs.configure_logging(level, fmt)
    except MQTasksError as exc:
        raise click.UsageError(str(exc)) from exc


def load_app(path: str) -> App:
    """Import the app named by ``-A``: ``module``, ``module:attr`` or ``module:factory()``.

    Only a trailing ``()`` calls anything: ``-A myapp:create_app()`` calls the
    factory; ``-A myapp:main`` must name an :class:`App` and is never called.

    Raises:
        click.UsageError: Nothing importable there is an :class:`App`.
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    call = path.endswith("()")
    target = path[:-2] if call else path
    try:
        obj = import_object(target)
    except MQTasksError as exc:
        raise click.UsageError(str(exc)) from exc
    if isinstance(obj, types.ModuleType):
        candidate = getattr(obj, "app", None)
        if isinstance(candidate, App):
            return candidate
        apps = [v for v in vars(obj).values() if isinstance(v, App)]
        if len(apps) == 1:
            return apps[0]
        raise click.UsageError(
            f"Module {path!r} has {'no' if not apps else 'several'} mqtasks App; "
            f"name one with -A {path}:<attribute>."
        )
    if call:
        if not callable(obj):
            raise click.UsageError(f"{target!r} is a {type(obj).__name__}, not callable.")
        obj = obj()
    if not isinstance(obj, App):
        hint = " (to call an app factory, write -A module:factory())" if callable(obj) else ""
        raise click.UsageError(f"{path!r} is a {type(obj).__name__}, not an mqtasks App{hint}.")
    return obj


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mqtasks")
def cli() -> None:
    """mqtasks: run and inspect task workers."""


@cli.command(epilog=HELP_EPILOG)
@click.option("-A", "--app", "app_path", required=True, help="The app: module[:attribute].")
@click.option(
    "-Q", "--queues", default=None, help="Comma-separated queues (default: all task queues)."
)
@click.option(
    "-c", "--concurrency", type=click.IntRange(min=1), default=None, help="Threads per process."
)
@click.option(
    "-p",
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes, each with its own connection; dead ones are replaced.",
)
@click.option(
    "--prefetch",
    type=click.IntRange(min=1),
    default=None,
    help="Unacknowledged messages held per process (default: 2 x concurrency).",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds running tasks may take to finish after SIGTERM (default 30).",
)
@click.option(
    "--log-level",
    type=click.Choice(logs.LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
    help="The lowest level logged.",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    default=None,
    help="json: one object per line; auto: console on a terminal, JSON otherwise "
    "(default: the log_format setting, MQTASKS_LOG_FORMAT, else auto).",
)
def worker(
    app_path: str,
    queues: str | None,
    concurrency: int | None,
    processes: int,
    prefetch: int | None,
    shutdown_timeout: float | None,
    log_level: str,
    log_format: str | None,
) -> None:
    """Consume the app's queues and run its tasks until SIGTERM or SIGINT."""
    env_format = os.environ.get("MQTASKS_LOG_FORMAT") or "auto"
    used = configure_logging(log_level, log_format or env_format)
    # Caught before the app is loaded: a SIGTERM while the app's modules import
    # (seconds on a loaded machine) is a clean stop, not death by signal.
    signals = None if processes > 1 else StopSignals()
    if processes > 1:
        argv = [sys.executable, "-m", "mqtasks", *sys.argv[1:]]
        sys.exit(Supervisor(_child_argv(argv), processes).run())
    app = load_app(app_path)
    if log_format is None and app.settings.log_format != env_format:
        # The app sets its own log_format: use it (loggers used while importing keep the first).
        used_by_app = logs.resolve_format(app.settings.log_format)
        if used_by_app != used:
            configure_logging(log_level, used_by_app)
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    _return_large_buffers_to_the_os()
    try:
        w = Worker(
            app,
            queues=queue_list,
            concurrency=concurrency,
            prefetch=prefetch,
            shutdown_timeout=shutdown_timeout,
        )
    except MQTasksError as exc:
        raise click.UsageError(str(exc)) from exc
    sys.exit(run_worker(w, signals))


#: Allocations from this size up get pages of their own (see below).
MMAP_THRESHOLD = 1024 * 1024

#: glibc's mallopt() parameter M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3


def _return_large_buffers_to_the_os() -> None:
    """Fix glibc's mmap threshold, so a worker's memory goes back after a large message.

    glibc raises its threshold to the size of the last large block freed (up to
    32 MiB), so after one large message every later one comes from the heap and
    the pages stay with the process: a worker that saw a few 20 MiB messages
    peaked 40 MiB higher than one that maps them. A fixed threshold turns that
    off. No library does this; it is a no-op where malloc is not glibc's, and
    ``MALLOC_MMAP_THRESHOLD_`` in the environment still wins.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


class StopSignals:
    """SIGTERM and SIGINT handling of a worker process; installed when created.

    The first signal asks the worker to stop (see :func:`run_worker`); a second
    one exits at once with code 4. Under ``--processes`` the supervisor's pid is
    in ``MQTASKS_SUPERVISOR_PID``: the child then ignores SIGINT (Ctrl-C reaches
    the whole process group, and the supervisor turns it into one SIGTERM per
    child). Create it before anything slow (loading the app), so that a signal
    that comes early is a clean stop too.
    """

    def __init__(self) -> None:
        #: Set by the first signal.
        self.stop = threading.Event()
        self.count = 0
        #: The supervisor's pid, when this process is one of its children.
        self.supervisor = os.environ.get("MQTASKS_SUPERVISOR_PID")
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN if self.supervisor else self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            logger.warning("worker.forced_exit", signal=signal.Signals(signum).name)
            logs.flush()  # os._exit skips the atexit hook that writes the last lines
            os._exit(RET_FORCED)
        logger.info("worker.stopping", signal=signal.Signals(signum).name)
        self.stop.set()


def run_worker(w: Worker, signals: StopSignals | None = None) -> int:
    """Run ``w`` until a signal; return the exit code.

    Args:
        w: The worker, not started yet.
        signals: Handlers installed earlier (:class:`StopSignals`); installed
            here if None. A signal that came already stops the worker before it
            connects, with exit code 0.

    Under ``--processes`` the child also stops by itself if the supervisor disappears.
    """
    if signals is None:
        signals = StopSignals()
    stop, supervisor = signals.stop, signals.supervisor
    if stop.is_set():
        logger.info("worker.stopped", clean=True, note="stopped before it started")
        return RET_OK
    try:
        w.start()
    except MQTasksError as exc:
        logger.error(
            "worker.start_failed", error=str(exc), broker=mask_url(w.app.settings.broker_url)
        )
        return RET_ERROR
    while not stop.wait(0.5):
        if w.join(0):  # the I/O thread ended on its own
            return RET_ERROR
        if supervisor and str(os.getppid()) != supervisor:
            logger.warning("worker.orphaned", supervisor=supervisor)
            break
    return RET_OK if w.stop() else RET_TIMEOUT


def _child_argv(argv: list[str]) -> list[str]:
    """Replace ``--processes N`` / ``-p N`` in ``argv`` by ``--processes 1``."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("-p", "--processes"):
            skip = i + 1 < len(argv)
            continue
        if arg.startswith("--processes=") or (arg.startswith("-p") and arg[2:].isdigit()):
            continue
        out.append(arg)
    return [*out, "--processes", "1"]


class Supervisor:
    """Runs N worker processes, replaces those that die, and stops them on a signal.

    Args:
        argv: Command line of one child worker.
        processes: How many children to keep running.
    """

    def __init__(self, argv: list[str], processes: int) -> None:
        self.argv = argv
        self.processes = processes
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.signals = 0
        self._restarts: list[float] = []

    def _spawn(self, slot: int) -> None:
        env = {
            **os.environ,
            "MQTASKS_WORKER_SLOT": str(slot),
            "MQTASKS_SUPERVISOR_PID": str(os.getpid()),
        }
        child = subprocess.Popen(self.argv, env=env)
        self.children[slot] = child
        logger.info("supervisor.child_started", slot=slot, pid=child.pid)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Children ignore SIGINT; each signal here becomes one SIGTERM per child
        # (first: drain, second: force), and a third one kills them.
        self.signals += 1
        self.stopping = True
        sig = signal.SIGKILL if self.signals > 2 else signal.SIGTERM
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(sig)

    def run(self) -> int:
        """Run until signalled; return the worst child exit code."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for slot in range(self.processes):
            self._spawn(slot)
        codes: dict[int, int] = {}
        while True:
            for slot, child in list(self.children.items()):
                code = child.poll()
                if code is None:
                    continue
                if self.stopping:
                    codes[slot] = code
                    del self.children[slot]
                    continue
                logger.warning("supervisor.child_died", slot=slot, pid=child.pid, code=code)
                self._restart_pause()
                if self.stopping:  # a signal came during the pause: no replacement
                    del self.children[slot]
                    continue
                self._spawn(slot)
            if self.stopping and not self.children:
                break
            time.sleep(0.2)
        return max((self._stop_code(c) for c in codes.values()), default=RET_OK)

    def _stop_code(self, code: int) -> int:
        """The exit code a stopped child stands for."""
        if code == -signal.SIGTERM and self.signals == 1:
            # Killed by our first SIGTERM before it installed its handler: it had
            # not started consuming (the handler comes first), so it held nothing.
            return RET_OK
        # Any other death by a signal is not a clean stop.
        return RET_FORCED if code < 0 else code

    def _restart_pause(self) -> None:
        # Back off when children die in a loop (a bad deploy), up to 10 s.
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < 60] + [now]
        pause = min(10.0, 0.1 * 2 ** max(0, len(self._restarts) - 2))
        end = now + pause
        while time.monotonic() < end and not self.stopping:
            time.sleep(0.05)


# -- dead letters ----------------------------------------------------------------

#: Most entries ``dlq show`` reads per queue while looking for an id.
SHOW_SCAN_LIMIT = 10_000
#: Above this many entries to replay, ``dlq replay`` shows a progress bar.
PROGRESS_THRESHOLD = 5


@cli.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters (the entries of <queue>.dlq)."""


def _dlq_app(app_path: str) -> App:
    return load_app(app_path)


def _fail(app: App, exc: MQTasksError) -> click.ClickException:
    # Transport errors already mask the broker URL; say which broker in masked form.
    return click.ClickException(f"{exc} (broker {mask_url(app.settings.broker_url)})")


def _when(entry: DeadLetter) -> str:
    return entry.failed_at.strftime("%Y-%m-%d %H:%M:%S") if entry.failed_at else "-"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


@dlq.command("ls")
@click.option("-A", "--app", "app_path", required=True, help="The app: module[:attribute].")
@click.argument("queue", required=False)
@click.option(
    "--limit", type=click.IntRange(min=1), default=100, show_default=True, help="Most per queue."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry, one per line.")
def dlq_ls(app_path: str, queue: str | None, limit: int, as_json: bool) -> None:
    """List dead letters of QUEUE (default: every queue of the app's tasks).

    On RabbitMQ, listing takes entries and requeues them: they are marked
    redelivered and may come back in another order.
    """
    app = _dlq_app(app_path)
    queues = [queue] if queue else app.task_queues()
    try:
        entries = [e for q in queues for e in list_dead_letters(app, q, limit=limit)]
    except MQTasksError as exc:
        raise _fail(app, exc) from exc
    finally:
        app.close()
    if as_json:
        for entry in entries:
            summary = entry.to_dict()
            del summary["body"], summary["headers"], summary["traceback"]
            click.echo(json.dumps(summary))
        return
    if not entries:
        click.echo(f"No dead letters in {', '.join(queues)}.")
        return
    rows = [
        [e.id, e.task or "-", e.reason or "-", str(e.attempts or "-"), _when(e), e.queue]
        for e in entries
    ]
    click.echo(_table(rows, ["ID", "TASK", "REASON", "ATTEMPTS", "FAILED AT (UTC)", "QUEUE"]))


@dlq.command("show")
@click.option("-A", "--app", "app_path", required=True, help="The app: module[:attribute].")
@click.argument("entry_id", metavar="ID")
@click.option("--queue", default=None, help="The queue (default: every queue of the app's tasks).")
@click.option("--json", "as_json", is_flag=True, help="The entry as a JSON object.")
def dlq_show(app_path: str, entry_id: str, queue: str | None, as_json: bool) -> None:
    """Show one dead letter in full, traceback included."""
    app = _dlq_app(app_path)
    queues = [queue] if queue else app.task_queues()
    found: DeadLetter | None = None
    try:
        for q in queues:
            for entry in list_dead_letters(app, q, limit=SHOW_SCAN_LIMIT):
                if entry.id == entry_id:
                    found = entry
                    break
            if found is not None:
                break
    except MQTasksError as exc:
        raise _fail(app, exc) from exc
    finally:
        app.close()
    if found is None:
        raise click.ClickException(f"No dead letter {entry_id!r} in {', '.join(queues)}.")
    data = found.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key in ("id", "task", "queue", "reason", "detail", "exception", "attempts", "failed_at"):
        click.echo(f"{key + ':':<12} {data[key] if data[key] is not None else '-'}")
    click.echo("headers:")
    for key, value in sorted(data["headers"].items()):
        if key != "mqtasks-death-traceback":
            click.echo(f"  {key}: {value}")
    click.echo(f"body:        {data['body']}")
    if found.traceback:
        click.echo("traceback:")
        click.echo(found.traceback.rstrip("\n"))


@dlq.command("replay")
@click.option("-A", "--app", "app_path", required=True, help="The app: module[:attribute].")
@click.argument("queue", required=False)
@click.option("--id", "ids", multiple=True, help="Replay only this id (repeatable).")
@click.option("--task", default=None, help="Replay only entries of this task.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Replay at most N.")
def dlq_replay(
    app_path: str, queue: str | None, ids: tuple[str, ...], task: str | None, limit: int | None
) -> None:
    """Send dead letters back to their queue as first attempts.

    Each is republished, confirmed by the broker, before it is removed from
    the dead-letter queue.
    """
    app = _dlq_app(app_path)
    queues = [queue] if queue else app.task_queues()
    total = 0
    try:
        for q in queues:
            remaining = None if limit is None else limit - total
            if remaining is not None and remaining <= 0:
                break
            expected = _dead_letter_count(app, q)
            if remaining is not None:
                expected = min(expected, remaining)
            if ids:
                expected = min(expected, len(ids))
            kwargs: dict[str, Any] = {"ids": ids or None, "task": task, "limit": remaining}
            if expected > PROGRESS_THRESHOLD:
                with click.progressbar(
                    length=expected, label=f"Replaying {q}", file=sys.stderr
                ) as bar:
                    total += replay_dead_letters(
                        app, q, on_replayed=lambda _: bar.update(1), **kwargs
                    )
            else:
                total += replay_dead_letters(app, q, **kwargs)
    except MQTasksError as exc:
        click.echo(f"Replayed {total} before the error.", err=True)
        raise _fail(app, exc) from exc
    finally:
        app.close()
    click.echo(f"Replayed {total} dead letter{'' if total == 1 else 's'}.")


def _dead_letter_count(app: App, queue: str) -> int:
    spec = dead_letter_spec(app.queue(queue))
    return app.transport.message_counts([spec]).get(spec.name, 0)


@dlq.command("purge")
@click.option("-A", "--app", "app_path", required=True, help="The app: module[:attribute].")
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Really delete every dead letter of QUEUE.")
def dlq_purge(app_path: str, queue: str, yes: bool) -> None:
    """Delete every dead letter of QUEUE (needs --yes)."""
    if not yes:
        raise click.UsageError(f"This deletes every dead letter of {queue!r}; add --yes to do it.")
    app = _dlq_app(app_path)
    try:
        count = purge_dead_letters(app, queue)
    except MQTasksError as exc:
        raise _fail(app, exc) from exc
    finally:
        app.close()
    click.echo(f"Purged {count} dead letter{'' if count == 1 else 's'} of {queue}.")


# -- status ------------------------------------------------------------------------

STATUS_EPILOG = """\b
Examples:
  mqtasks status -A myapp                 # every queue of the app's tasks
  mqtasks status -A myapp emails reports  # these queues
  mqtasks status -A myapp --watch         # refresh every 2 s, with READY/S
  mqtasks status -A myapp --watch 10 --json | jq .queues[0].ready

\b
Columns:
  READY      waiting for a consumer
  UNACKED    delivered to a consumer, not acknowledged yet
  DELAYED    held by the broker for a countdown or retry backoff
  DEAD       entries of the queue's dead-letter queue (QUEUE.dlq)
  CONSUMERS  consumers attached to the queue
  READY/S    change of READY per second over the last minute (--watch):
             negative while the queue drains, positive while it backs up

\b
Exit codes:
  0  the status was printed (a missing queue is reported, not an error)
  1  the broker is unreachable or refused
  2  bad command line, including -A naming no app and invalid queue names
"""


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _status_table(statuses: list[QueueStatus], broker: str) -> str:
    rows: list[list[str]] = []
    for s in statuses:
        if not s.exists:
            rows.append([s.queue, "missing", "", "", "", "", ""])
            continue
        delayed = _count(s.delayed) + ("*" if s.delayed_scope == "vhost" else "")
        rate = "-" if s.ready_rate is None else f"{s.ready_rate:+.2f}"
        rows.append(
            [
                s.queue,
                _count(s.ready),
                _count(s.unacked),
                delayed,
                _count(s.dead_lettered),
                _count(s.consumers),
                rate,
            ]
        )
    header = ["QUEUE", "READY", "UNACKED", "DELAYED", "DEAD", "CONSUMERS", "READY/S"]
    when = statuses[0].sampled_at.strftime("%Y-%m-%d %H:%M:%S") if statuses else ""
    lines = [f"{broker}  {when} UTC", _table(rows, header)]
    present = [s for s in statuses if s.exists]
    if any(s.unacked is None for s in present):
        lines.append("UNACKED -: not reported by this broker (RabbitMQ: only its management API).")
    if any(s.delayed_scope == "vhost" for s in present):
        lines.append(
            "DELAYED *: held for every queue of the vhost; RabbitMQ's delay queues are shared."
        )
    if present and all(s.ready_rate is None for s in present):
        lines.append("READY/S -: needs two samples; use --watch.")
    return "\n".join(lines)


@cli.command(epilog=STATUS_EPILOG)
@click.option("-A", "--app", "app_path", required=True, help="The app: module[:attribute].")
@click.argument("queues", nargs=-1)
@click.option(
    "--watch",
    type=click.FloatRange(min=0, min_open=True),
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="Refresh every SECONDS (2 if omitted) until Ctrl-C; put QUEUEs before it.",
)
@click.option(
    "-n",
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="With --watch: stop after N samples.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document per sample, one per line.")
def status(
    app_path: str,
    queues: tuple[str, ...],
    watch: float | None,
    count: int | None,
    as_json: bool,
) -> None:
    """Show ready, unacked, delayed and dead-lettered messages and consumers per
    queue (default: every queue of the app's tasks)."""
    if count is not None and watch is None:
        raise click.UsageError("--count needs --watch.")
    app = load_app(app_path)
    broker = mask_url(app.settings.broker_url)
    try:
        monitor = StatusMonitor(app, list(queues) or None)
    except MQTasksError as exc:
        raise click.UsageError(str(exc)) from exc
    samples = 0
    try:
        while True:
            statuses = monitor.sample()
            samples += 1
            if as_json:
                document = {
                    "broker": broker,
                    "sampled_at": statuses[0].sampled_at.isoformat() if statuses else None,
                    "queues": [s.to_dict() for s in statuses],
                }
                click.echo(json.dumps(document))
            else:
                if watch is not None and sys.stdout.isatty():
                    click.clear()
                elif samples > 1:
                    click.echo()
                click.echo(_status_table(statuses, broker))
            if watch is None or (count is not None and samples >= count):
                return
            sys.stdout.flush()
            time.sleep(watch)
    except MQTasksError as exc:
        message = str(exc) if broker in str(exc) else f"{exc} (broker {broker})"
        raise click.ClickException(message) from exc
    except KeyboardInterrupt:
        return
    finally:
        app.close()


def main() -> None:
    """Entry point of the ``mqtasks`` console script."""
    try:
        cli(prog_name="mqtasks")
    except Exception:
        # Not a usage or broker error (those are reported by click): print the
        # traceback, chained causes included, with passwords masked.
        sys.stderr.write(redact(traceback.format_exc()))
        sys.exit(RET_ERROR)
