"""``mqtasks beat``: send the app's periodic ticks (any number may run: one leads at a time)."""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone

import click
import structlog

from ..config import mask_url
from ..exceptions import ConfigurationError, MQTasksError
from ..process import RET_ERROR, RET_OK, StopSignals
from ..scheduler import DEFAULT_LEASE_TTL, Scheduler
from . import app_option, cli, configure_logging, load_app, log_options, table

__all__ = ["BEAT_EPILOG", "beat"]

logger = structlog.get_logger("mqtasks.cli")

#: The end of ``mqtasks beat --help``: examples and exit codes.
BEAT_EPILOG = """\b
Examples:
  mqtasks beat -A myapp            # run the scheduler (run it on as many hosts as you like)
  mqtasks beat -A myapp --list     # each schedule, its next run, last sent tick, the leader
  mqtasks worker -A myapp --beat   # the same scheduler, inside a worker

\b
The schedulers share a lease in the result backend: one sends the ticks,
the others take over within --lease-ttl seconds if it stops. Each tick is
sent once, with the task id periodic:<schedule>:<tick time>.

\b
Exit codes:
  0  stopped by SIGTERM/SIGINT (the lease is given up), or --list printed
  1  the result backend or broker is unreachable
  2  bad command line: -A naming no app, an app without a result backend or
     without schedules
  4  a second SIGTERM/SIGINT forced an immediate exit
"""


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S%z")


@cli.command(epilog=BEAT_EPILOG)
@app_option
@click.option(
    "--lease-ttl",
    type=click.FloatRange(min=1.0),
    default=DEFAULT_LEASE_TTL,
    show_default=True,
    help="Seconds the leader's lease lasts unless renewed: the longest a failover takes.",
)
@click.option("--list", "list_only", is_flag=True, help="Print the schedules and exit.")
@log_options
def beat(
    app_path: str, lease_ttl: float, list_only: bool, log_level: str, log_format: str | None
) -> None:
    """Send the periodic ticks of the app's schedules, each once, whatever runs beside it."""
    configure_logging(
        "warning" if list_only else log_level,
        log_format or os.environ.get("MQTASKS_LOG_FORMAT") or "auto",
    )
    signals = None if list_only else StopSignals()
    app = load_app(app_path)
    if log_format is None and not list_only:
        configure_logging(log_level, app.settings.log_format or "auto")  # the app's own setting
    try:
        scheduler = Scheduler(app, lease_ttl=lease_ttl)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc
    url = mask_url(app.settings.backend_url or "")
    if list_only:
        try:
            rows = scheduler.listing()
        except MQTasksError as exc:
            raise click.ClickException(f"{exc} (result backend {url})") from exc
        finally:
            app.close()
        leader = rows[0].leader if rows else None
        click.echo(
            table(
                [[r.name, r.task, r.schedule, _when(r.next_run), _when(r.last_sent)] for r in rows],
                ["SCHEDULE", "TASK", "WHEN", "NEXT RUN", "LAST SENT"],
            )
        )
        click.echo(f"\nleader: {leader or 'none (no scheduler holds the lease)'}")
        return
    assert signals is not None
    try:
        app.backend.check()
    except MQTasksError as exc:
        logger.error("periodic.unreachable", error=str(exc), backend=url)
        app.close()
        sys.exit(RET_ERROR)
    try:
        scheduler.run(signals.stop)
    finally:
        app.close()
    sys.exit(RET_OK)
