"""The ``mqtasks`` command line: ``mqtasks worker -A myapp``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import types
from typing import Any

import click
import structlog

from . import __version__
from ._importing import import_object
from .app import App
from .config import mask_url
from .exceptions import MQTasksError
from .worker import Worker

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


def configure_logging(level: str, fmt: str) -> None:
    """Set up structlog (and stdlib logging for kombu) to write to stderr."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise click.BadParameter(f"unknown log level {level!r}", param_hint="--log-level")
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)


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
@click.option("--log-level", default="info", show_default=True, help="debug, info, warning, error.")
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    default="auto",
    show_default=True,
    help="console on a terminal, JSON otherwise.",
)
def worker(
    app_path: str,
    queues: str | None,
    concurrency: int | None,
    processes: int,
    prefetch: int | None,
    shutdown_timeout: float | None,
    log_level: str,
    log_format: str,
) -> None:
    """Consume the app's queues and run its tasks until SIGTERM or SIGINT."""
    configure_logging(log_level, log_format)
    if processes > 1:
        argv = [sys.executable, "-m", "mqtasks", *sys.argv[1:]]
        sys.exit(Supervisor(_child_argv(argv), processes).run())
    app = load_app(app_path)
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
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
    sys.exit(run_worker(w))


def run_worker(w: Worker) -> int:
    """Run ``w`` until a signal; return the exit code.

    Under ``--processes`` the supervisor's pid is in ``MQTASKS_SUPERVISOR_PID``:
    the child then ignores SIGINT (Ctrl-C reaches the whole process group, and
    the supervisor turns it into one SIGTERM per child) and stops by itself if
    the supervisor disappears.
    """
    stop = threading.Event()
    signals = {"count": 0}
    supervisor = os.environ.get("MQTASKS_SUPERVISOR_PID")

    def on_signal(signum: int, frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            logger.warning("worker.forced_exit", signal=signal.Signals(signum).name)
            os._exit(RET_FORCED)
        logger.info("worker.stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN if supervisor else on_signal)
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
                self._spawn(slot)
            if self.stopping and not self.children:
                break
            time.sleep(0.2)
        # A child killed by a signal (negative code) did not stop cleanly either.
        return max((RET_FORCED if c < 0 else c for c in codes.values()), default=RET_OK)

    def _restart_pause(self) -> None:
        # Back off when children die in a loop (a bad deploy), up to 10 s.
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < 60] + [now]
        pause = min(10.0, 0.1 * 2 ** max(0, len(self._restarts) - 2))
        end = now + pause
        while time.monotonic() < end and not self.stopping:
            time.sleep(0.05)


def main() -> None:
    """Entry point of the ``mqtasks`` console script."""
    cli(prog_name="mqtasks")
