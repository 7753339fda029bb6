"""``mqtasks dlq``: list, show, replay and purge an app's dead letters.

The commands print and confirm; reading and moving dead letters is
:mod:`mqtasks.dlq`'s.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..app import App
from ..config import mask_url
from ..dlq import DeadLetter, list_dead_letters, purge_dead_letters, replay_dead_letters
from ..exceptions import MQTasksError
from ..transport.base import dead_letter_spec
from . import app_option, cli, load_app, table

__all__ = ["PROGRESS_THRESHOLD", "SHOW_SCAN_LIMIT", "dlq"]

#: Most entries ``dlq show`` reads per queue while looking for an id.
SHOW_SCAN_LIMIT = 10_000
#: Above this many entries to replay, ``dlq replay`` shows a progress bar.
PROGRESS_THRESHOLD = 5


@cli.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters (the entries of <queue>.dlq)."""


def _fail(app: App, exc: MQTasksError) -> click.ClickException:
    # Transport errors already mask the broker URL; say which broker in masked form.
    return click.ClickException(f"{exc} (broker {mask_url(app.settings.broker_url)})")


def _when(entry: DeadLetter) -> str:
    return entry.failed_at.strftime("%Y-%m-%d %H:%M:%S") if entry.failed_at else "-"


@dlq.command("ls")
@app_option
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
    app = load_app(app_path)
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
    click.echo(table(rows, ["ID", "TASK", "REASON", "ATTEMPTS", "FAILED AT (UTC)", "QUEUE"]))


@dlq.command("show")
@app_option
@click.argument("entry_id", metavar="ID")
@click.option("--queue", default=None, help="The queue (default: every queue of the app's tasks).")
@click.option("--json", "as_json", is_flag=True, help="The entry as a JSON object.")
def dlq_show(app_path: str, entry_id: str, queue: str | None, as_json: bool) -> None:
    """Show one dead letter in full, traceback included."""
    app = load_app(app_path)
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
@app_option
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
    app = load_app(app_path)
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
@app_option
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Really delete every dead letter of QUEUE.")
def dlq_purge(app_path: str, queue: str, yes: bool) -> None:
    """Delete every dead letter of QUEUE (needs --yes)."""
    if not yes:
        raise click.UsageError(f"This deletes every dead letter of {queue!r}; add --yes to do it.")
    app = load_app(app_path)
    try:
        count = purge_dead_letters(app, queue)
    except MQTasksError as exc:
        raise _fail(app, exc) from exc
    finally:
        app.close()
    click.echo(f"Purged {count} dead letter{'' if count == 1 else 's'} of {queue}.")
