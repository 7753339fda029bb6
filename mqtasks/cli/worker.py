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
from ..control import ControlAgent
from ..exceptions import ConfigurationError, MQTasksError
from ..execution.autoscale import Autoscaler, LoadReporter
from ..middleware.prometheus import PrometheusMetrics, SupervisorMetrics, serve_metrics
from ..process import (
    LOAD_DIR_ENV,
    Companion,
    StopSignals,
    Supervisor,
    fork_blockers,
    return_large_buffers_to_the_os,
    run_worker,
)
from ..scheduler import Scheduler, check_scheduler
from ..transport import transport_class
from ..worker import Worker
from . import app_option, cli, configure_logging, load_app, log_options

__all__ = ["HELP_EPILOG", "worker"]

logger = structlog.get_logger("mqtasks.cli")

#: The end of ``mqtasks worker --help``: examples and exit codes.
HELP_EPILOG = """\b
Examples:
  mqtasks worker -A myapp                 # the 'app' attribute of module myapp
  mqtasks worker -A myapp.tasks:app -Q emails,reports -c 16
  mqtasks worker -A myapp --processes 2   # two processes, each with 8 threads
  mqtasks worker -A myapp --autoscale 2,16  # 2 to 16 threads, following the backlog
  mqtasks worker -A myapp -p 2 --autoscale 1,6 -c 4  # 1 to 6 processes of 4 threads
  mqtasks worker -A myapp --beat          # also send periodic ticks (see mqtasks beat)
  mqtasks worker -A myapp --metrics-port 9808  # Prometheus metrics on :9808/metrics

\b
Exit codes:
  0  stopped cleanly (SIGTERM/SIGINT: running tasks finished)
  1  could not start: the broker is unreachable, or the app module raised
  2  bad command line, including -A naming no app and impossible settings
  3  shutdown grace period ran out; unfinished tasks were left to the broker
  4  a second SIGTERM/SIGINT forced an immediate exit
  5  recycled: threads past their hard time limit piled up (with --processes
     the supervisor starts a fresh child at once; without, restart it yourself)
"""


def _check_autoscale_prefetch(prefetch: int | None, given_by: str, maximum: int) -> None:
    """A fixed prefetch below the autoscale MAX would leave threads idle: a usage error."""
    if prefetch is not None and prefetch < maximum:
        raise click.UsageError(
            f"{given_by} ({prefetch}) is below the autoscale MAX ({maximum}): threads "
            "past it would idle. Raise it, or leave it unset to follow the threads."
        )


def _autoscale_bounds(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    """``MIN,MAX`` as two whole numbers, 1 <= MIN <= MAX; otherwise a usage error."""
    if value is None:
        return None
    try:
        low, high = (int(p.strip()) for p in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not MIN,MAX (two whole numbers, such as 2,10)."
        ) from None
    if not 1 <= low <= high:
        raise click.BadParameter(f"{value!r}: MIN and MAX must satisfy 1 <= MIN <= MAX.")
    return low, high


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
    "--autoscale",
    callback=_autoscale_bounds,
    default=None,
    metavar="MIN,MAX",
    help="Grow the threads toward MAX while all are busy and messages wait in the queues, "
    "shrink toward MIN (one at a time) when some stay unused for --autoscale-idle seconds; "
    "the worker starts with MIN threads and -c is ignored (as Celery does). With "
    "--processes, the number of processes scales instead, starting with --processes "
    "(within MIN..MAX), each with -c threads. Prefetch follows (2 x threads) unless "
    "--prefetch is given.",
)
@click.option(
    "--autoscale-idle",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds a thread (with --processes: a process's worth of threads) stays unused, "
    "with nothing waiting, before autoscaling retires one.",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds running tasks may take to finish after SIGTERM (default 30).",
)
@click.option(
    "--beat",
    is_flag=True,
    help="Also run the periodic-task scheduler (see mqtasks beat); any number of workers may.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    envvar="MQTASKS_METRICS_PORT",
    help="Serve Prometheus metrics on this port (needs mqtasks[prometheus]); with "
    "--processes the supervisor serves the sum over its children.",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    envvar="MQTASKS_METRICS_HOST",
    help="Address the metrics port listens on.",
)
@log_options
def worker(
    app_path: str,
    queues: str | None,
    concurrency: int | None,
    processes: int,
    prefetch: int | None,
    autoscale: tuple[int, int] | None,
    autoscale_idle: float,
    shutdown_timeout: float | None,
    beat: bool,
    metrics_port: int | None,
    metrics_host: str,
    log_level: str,
    log_format: str | None,
) -> None:
    """Consume the app's queues and run its tasks until SIGTERM or SIGINT."""
    env_format = os.environ.get("MQTASKS_LOG_FORMAT") or "auto"
    used = configure_logging(log_level, log_format or env_format)
    scaling = _scaling_mode(autoscale)
    if scaling == "threads" and autoscale is not None:
        if concurrency is not None:
            logger.warning(
                "worker.concurrency_ignored", concurrency=concurrency, autoscale=autoscale
            )
        _check_autoscale_prefetch(prefetch, "--prefetch", autoscale[1])
        concurrency = autoscale[0]
    elif scaling == "processes" and autoscale is not None:
        processes = max(autoscale[0], min(autoscale[1], processes))
    supervise = processes > 1 or scaling == "processes"
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
    if scaling == "threads" and autoscale is not None and prefetch is None:
        # A prefetch set in the environment or by the app does not follow the threads either.
        _check_autoscale_prefetch(app.settings.prefetch, "the prefetch setting", autoscale[1])
    if beat:
        try:
            check_scheduler(app)
        except MQTasksError as exc:
            raise click.UsageError(f"--beat: {exc}") from exc
    if metrics_port is not None:
        _install_metrics(app)
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    return_large_buffers_to_the_os()  # in the supervisor too: forked children inherit it
    options: dict[str, Any] = {
        "queues": queue_list,
        "concurrency": concurrency,
        "prefetch": prefetch,
        "shutdown_timeout": shutdown_timeout,
    }
    if supervise:
        bounds = autoscale if scaling == "processes" else None
        metrics = _supervisor_metrics(metrics_port, metrics_host)
        try:
            code = _run_supervisor(
                app, processes, signals, log_level, used, options, bounds, autoscale_idle, beat,
                metrics=metrics,
            )  # fmt: skip
        finally:
            if metrics is not None:
                metrics.stop()
        sys.exit(code)
    w = _build_worker(app, options)
    companions = _companions(w, scaling, autoscale, autoscale_idle, beat)
    # A child of a supervisor (started anew with this command line) writes its
    # metrics for the supervisor to serve: it does not serve them itself.
    served = None
    if metrics_port is not None and not os.environ.get("MQTASKS_SUPERVISOR_PID"):
        try:
            served = serve_metrics(metrics_port, metrics_host)
        except ConfigurationError as exc:
            raise click.UsageError(f"--metrics-port: {exc}") from exc
    try:
        code = run_worker(w, signals, companions=companions)
    finally:
        if served is not None:
            served.stop()
    sys.exit(code)


def _install_metrics(app: App) -> None:
    """Add :class:`PrometheusMetrics` to ``app``'s middleware unless it has it already."""
    try:
        if not any(isinstance(mw, PrometheusMetrics) for mw in app.middleware):
            app.middleware.append(PrometheusMetrics())
    except ConfigurationError as exc:
        raise click.UsageError(f"--metrics-port: {exc}") from exc


def _supervisor_metrics(port: int | None, host: str) -> SupervisorMetrics | None:
    """The supervisor's metrics for ``--metrics-port``: made before any child starts."""
    if port is None:
        return None
    try:
        return SupervisorMetrics(port, host)
    except ConfigurationError as exc:
        raise click.UsageError(f"--metrics-port: {exc}") from exc


def _scaling_mode(autoscale: tuple[int, int] | None) -> str | None:
    """What ``--autoscale`` scales here: ``threads``, ``processes``, ``report`` (a child of a
    supervisor that scales processes: it reports its load), or None."""
    if autoscale is None:
        return None
    if os.environ.get(LOAD_DIR_ENV) and os.environ.get("MQTASKS_SUPERVISOR_PID"):
        return "report"
    ctx = click.get_current_context()
    source = ctx.get_parameter_source("processes")
    explicit = source not in (None, click.core.ParameterSource.DEFAULT)
    return "processes" if explicit else "threads"


def _companions(
    w: Worker,
    scaling: str | None,
    autoscale: tuple[int, int] | None,
    idle: float,
    beat: bool = False,
) -> list[Companion]:
    """The control agent (heartbeats, inspect and control) of every worker; the
    autoscaler of a worker that scales its threads, or the load reporter of a
    child whose supervisor scales the processes; and the scheduler with ``--beat``."""
    companions: list[Companion] = [ControlAgent(w)]
    if beat:
        companions.append(Scheduler(w.app))
    directory = os.environ.get(LOAD_DIR_ENV)
    if scaling == "threads" and autoscale is not None:
        companions.append(Autoscaler(w, *autoscale, idle=idle))
    elif scaling == "report" and directory:
        slot = os.environ.get("MQTASKS_WORKER_SLOT", "0")
        companions.append(LoadReporter(w, os.path.join(directory, f"{slot}.json")))
    return companions


def _build_worker(app: App, options: dict[str, Any]) -> Worker:
    """The worker for ``app``; impossible options are a usage error (exit code 2)."""
    try:
        return Worker(app, **options)
    except MQTasksError as exc:
        raise click.UsageError(str(exc)) from exc


def _run_supervisor(
    app: App,
    processes: int,
    signals: StopSignals,
    log_level: str,
    log_format: str,
    options: dict[str, Any],
    autoscale: tuple[int, int] | None = None,
    autoscale_idle: float = 30.0,
    beat: bool = False,
    *,
    metrics: SupervisorMetrics | None = None,
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
            command,
            processes,
            signals,
            log_level=log_level,
            log_format=log_format,
            autoscale=autoscale,
            autoscale_idle=autoscale_idle,
            metrics=metrics,
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
        reporting = "report" if autoscale is not None else None
        companions = _companions(w, reporting, None, 0.0, beat)
        return run_worker(w, child_signals, companions=companions)

    supervisor = Supervisor(
        command,
        processes,
        signals,
        fork=child,
        log_level=log_level,
        log_format=log_format,
        autoscale=autoscale,
        autoscale_idle=autoscale_idle,
        metrics=metrics,
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
