"""``mqtasks worker``: consume an app's queues and run its tasks.

The command turns options into a :class:`~mqtasks.worker.Worker`; the
signals, exit codes and the ``--processes`` supervisor it runs under are
:mod:`mqtasks.process`'s.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any
from urllib.parse import urlsplit

import click
import structlog

from .. import logging as logs
from ..app import App
from ..exceptions import MQTasksError
from ..process import (
    StopSignals,
    Supervisor,
    fork_blockers,
    return_large_buffers_to_the_os,
    run_worker,
)
from ..transport import transport_class
from ..worker import Worker
from . import app_option, cli, configure_logging, load_app

__all__ = ["HELP_EPILOG", "worker"]

logger = structlog.get_logger("mqtasks.cli")

#: The end of ``mqtasks worker --help``: examples and exit codes.
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


@cli.command(epilog=HELP_EPILOG)
@app_option
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
    help="Worker processes, forked from this one after it loads the app, each with its own "
    "connection; one that dies is replaced by a new interpreter.",
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
    supervise = processes > 1
    if supervise:  # the supervisor forks its children: no log writer thread in it
        logs.configure_logging(log_level, used, background=False)
    # Caught before the app is loaded: a SIGTERM while the app's modules import
    # (seconds on a loaded machine) is a clean stop, not death by signal.
    signals = StopSignals()
    app = load_app(app_path)
    if log_format is None and app.settings.log_format != env_format:
        # The app sets its own log_format: use it (loggers used while importing keep the first).
        used_by_app = logs.resolve_format(app.settings.log_format)
        if used_by_app != used:
            used = logs.configure_logging(log_level, used_by_app, background=not supervise)
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    return_large_buffers_to_the_os()  # in the supervisor too: forked children inherit it
    options: dict[str, Any] = {
        "queues": queue_list,
        "concurrency": concurrency,
        "prefetch": prefetch,
        "shutdown_timeout": shutdown_timeout,
    }
    if supervise:
        sys.exit(_supervise(app, processes, signals, log_level, used, options))
    sys.exit(run_worker(_build_worker(app, options), signals))


def _build_worker(app: App, options: dict[str, Any]) -> Worker:
    """The worker for ``app``; impossible options are a usage error (exit code 2)."""
    try:
        return Worker(app, **options)
    except MQTasksError as exc:
        raise click.UsageError(str(exc)) from exc


def _supervise(
    app: App,
    processes: int,
    signals: StopSignals,
    log_level: str,
    log_format: str,
    options: dict[str, Any],
) -> int:
    """Run ``processes`` children under a supervisor; return its exit code.

    The first children are forked from this process, which has loaded the app,
    so that they share its pages; where forking is unsafe (see
    :func:`~mqtasks.process.fork_blockers`) they start as fresh interpreters, as
    every replacement of a child that died does.
    """
    command = _child_argv([sys.executable, "-m", "mqtasks", *sys.argv[1:]])
    blockers = fork_blockers()
    if blockers:
        logger.warning(
            "supervisor.not_forking",
            reasons=blockers,
            hint="children start as fresh interpreters and share no memory with each other; "
            "start threads and connections on first use or in a worker_boot hook, "
            "not while the app module imports",
        )
        supervisor = Supervisor(
            command, processes, signals, log_level=log_level, log_format=log_format
        )
        return supervisor.run()

    _preload(app)

    def child(child_signals: StopSignals) -> int:
        logs.configure_logging(log_level, log_format)  # with a writer thread of its own
        try:
            w = _build_worker(app, options)
        except click.UsageError as exc:
            exc.show()
            return exc.exit_code
        return run_worker(w, child_signals)

    supervisor = Supervisor(
        command, processes, signals, fork=child, log_level=log_level, log_format=log_format
    )
    return supervisor.run()


def _preload(app: App) -> None:
    """Import what each child would import on connecting, so that the children share it."""
    url = app.settings.broker_url
    with contextlib.suppress(MQTasksError):  # an unknown scheme: each child says so
        transport_class(urlsplit(url).scheme.lower() if "://" in url else url)
    import encodings.idna  # noqa: F401  - the codec that resolving a host name loads


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
