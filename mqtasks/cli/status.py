"""``mqtasks status``: the state of an app's queues, once or ``--watch``-ing.

The command prints and refreshes; sampling the broker is
:mod:`mqtasks.status`'s.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from ..config import mask_url
from ..exceptions import MQTasksError
from ..middleware.circuits import circuit_status
from ..middleware.limits import limit_status
from ..status import QueueStatus, StatusMonitor
from . import app_option, cli, load_app, table
from .circuit import circuit_table

if TYPE_CHECKING:
    from ..app import App

__all__ = ["STATUS_EPILOG", "status"]

#: The end of ``mqtasks status --help``: examples, columns and exit codes.
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
  LAG        how long the oldest ready message has waited since it was
             published (0s: nothing waits)
  ACK/S      messages acknowledged per second (RabbitMQ's management API)
  DEAD/S     error rate: messages dead-lettered per second (RabbitMQ's
             management API; elsewhere the rise of DEAD, with --watch)
  READY/S    change of READY per second over the last minute (--watch):
             negative while the queue drains, positive while it backs up
  -          unknown: the broker cannot tell (a footnote says why); never
             an estimate
  LIMIT/USE  a task's rate limit (tokens left of the bucket) or concurrency
             limit (slots held across every worker), when the app declares any
  CIRCUIT    each circuit breaker's state and failures in its window

\b
Exit codes:
  0  the status was printed (a missing queue is reported, not an error)
  1  the broker is unreachable or refused
  2  bad command line, including -A naming no app and invalid queue names
"""


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _duration(seconds: float | None) -> str:
    """``-``, ``42s``, ``3m05s``, ``2h10m`` or ``3d04h``."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


#: Why a column shows ``-`` (unknown), by column.
_UNKNOWN = {
    "UNACKED": "unknown: RabbitMQ counts it only in its management plugin's HTTP API, "
    "which did not answer (rabbitmq-plugins enable rabbitmq_management; "
    "setting rabbitmq_management_url).",
    "LAG": "unknown: the broker does not tell when its oldest message was published "
    "(RabbitMQ: only its management API, for classic queues).",
    "ACK/S": "unknown: only RabbitMQ's management API measures it.",
    "DEAD/S": "unknown: needs two samples (use --watch) or RabbitMQ's management API.",
}


def _status_table(statuses: list[QueueStatus], broker: str) -> str:
    rows: list[list[str]] = []
    header = ["QUEUE", "READY", "UNACKED", "DELAYED", "DEAD", "CONSUMERS"]
    header += ["LAG", "ACK/S", "DEAD/S", "READY/S"]
    for s in statuses:
        if not s.exists:
            rows.append([s.queue, "missing"] + [""] * (len(header) - 2))
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
                _duration(s.lag),
                _rate(s.ack_rate),
                _rate(s.error_rate),
                rate,
            ]
        )
    when = statuses[0].sampled_at.strftime("%Y-%m-%d %H:%M:%S") if statuses else ""
    lines = [f"{broker}  {when} UTC", table(rows, header)]
    present = [s for s in statuses if s.exists]
    unknown = {
        "UNACKED": any(s.unacked is None for s in present),
        "LAG": any(s.lag is None for s in present),
        "ACK/S": any(s.ack_rate is None for s in present),
        "DEAD/S": any(s.error_rate is None for s in present),
    }
    lines += [f"{column} -: {_UNKNOWN[column]}" for column, shown in unknown.items() if shown]
    if any(s.delayed_scope == "vhost" for s in present):
        lines.append(
            "DELAYED *: held for every queue of the vhost; RabbitMQ's delay queues are shared."
        )
    if present and all(s.ready_rate is None for s in present):
        lines.append("READY/S -: needs two samples; use --watch.")
    return "\n".join(lines)


def _limit_table(rows: list[dict[str, Any]]) -> str:
    """Lay out :func:`~mqtasks.middleware.limits.limit_status` rows as a table."""
    lines: list[list[str]] = []
    for r in rows:
        if "error" in r:
            use = f"unknown: {r['error']}"
        elif r["kind"] == "rate" and "per" in r:
            use = f"a bucket per {r['per']}"
        elif r["kind"] == "rate":
            use = f"{r['tokens']:g} of {r['capacity']:g} tokens left"
        else:
            use = f"{r['held']} of {r['limit']} slots held"
        lines.append([str(r["task"]), str(r["kind"]), str(r["limit"]), use])
    return table(lines, ["TASK", "LIMIT", "VALUE", "USE"])


def _flow(app: App) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The app's limits and circuits with their current use (none without a backend)."""
    if not app.has_backend:
        return [], []
    circuits = circuit_status(app) if app.circuits else []
    return limit_status(app), circuits


@cli.command(epilog=STATUS_EPILOG)
@app_option
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
    """Show ready, unacked, delayed and dead-lettered messages, consumers, lag and
    rates per queue (default: every queue of the app's tasks)."""
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
            limits, circuits = _flow(app)
            samples += 1
            if as_json:
                document = {
                    "broker": broker,
                    "sampled_at": statuses[0].sampled_at.isoformat() if statuses else None,
                    "queues": [s.to_dict() for s in statuses],
                    "limits": limits,
                    "circuits": circuits,
                }
                click.echo(json.dumps(document))
            else:
                if watch is not None and sys.stdout.isatty():
                    click.clear()
                elif samples > 1:
                    click.echo()
                click.echo(_status_table(statuses, broker))
                for rows, layout in ((limits, _limit_table), (circuits, circuit_table)):
                    if rows:
                        click.echo()
                        click.echo(layout(rows))
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
