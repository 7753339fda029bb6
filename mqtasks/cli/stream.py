"""``mqtasks stream``: look at an app's replayable streams and rewind a subscriber group.

``ls`` lists the app's streams (length, first and last entry), ``show`` prints
entries without moving any group, ``replay`` sets a group's position back (or
forward) so that its subscriber runs the entries from there again.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import click

from ..exceptions import ConfigurationError, MQTasksError
from ..streams import StartAt, StreamSpec, check_start, stream_subscriptions
from . import app_option, cli, load_app, table

__all__ = ["STREAM_EPILOG", "parse_position", "stream"]

#: The end of ``mqtasks stream --help``: examples and exit codes.
STREAM_EPILOG = """\b
Examples:
  mqtasks stream ls -A myapp
  mqtasks stream show orders -A myapp --from first --limit 20
  mqtasks stream replay orders -A myapp --subscriber myapp.rebuild --from 2024-05-01T00:00:00Z
  mqtasks stream replay orders -A myapp --subscriber myapp.rebuild --from 1200

\b
Exit codes:
  0  done
  1  the broker is unreachable or refused
  2  bad command line, including -A naming no app, an unknown stream or subscriber
"""


def parse_position(text: str) -> StartAt:
    """Return the position ``--from`` names: ``first``, ``last``, an offset or an ISO time
    (UTC when it names no zone).

    Raises:
        click.BadParameter: None of these.
    """
    if text in ("first", "last"):
        return text
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: give first, last, an offset (1200) or an ISO time (2024-05-01T00:00:00Z)."
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return check_start(when)


def _spec(app_streams: dict[str, StreamSpec], name: str) -> StreamSpec:
    spec = app_streams.get(name)
    if spec is None:
        known = ", ".join(app_streams) or "none"
        raise click.UsageError(f"The app has no stream {name!r} (its streams: {known}).")
    return spec


@cli.group(epilog=STREAM_EPILOG)
def stream() -> None:
    """Look at replayable streams and rewind subscriber groups."""


@stream.command(name="ls")
@app_option
def ls(app_path: str) -> None:
    """List the app's streams: length, first and last entry, subscriber groups."""
    app = load_app(app_path)
    try:
        store = app.transport.streams()
        rows = []
        for spec in app.streams.values():
            groups = [s.queue for s in app.subscriptions if s.stream == spec.name]
            info = store.info(spec, groups)
            rows.append(
                [
                    spec.name,
                    str(info.length) if info.exists else "-",
                    info.first or "-",
                    info.last or "-",
                    ", ".join(groups) or "-",
                ]
            )
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc
    except MQTasksError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        app.close()
    if not rows:
        click.echo("The app has no streams (App(..., streams=[StreamSpec(...)])).")
        return
    click.echo(table(rows, ["STREAM", "LENGTH", "FIRST", "LAST", "SUBSCRIBERS"]))


@stream.command()
@app_option
@click.argument("name")
@click.option(
    "--from", "start", default="first", show_default=True, help="first, last, offset or ISO time."
)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100000))
def show(app_path: str, name: str, start: str, limit: int) -> None:
    """Print entries of stream NAME (no group's position moves): id, time, key, payload."""
    app = load_app(app_path)
    spec = _spec(app.streams, name)
    position = parse_position(start)
    try:
        entries = app.transport.streams().entries(spec, position, limit)
    except MQTasksError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        app.close()
    for entry in entries:
        when = (
            datetime.fromtimestamp(entry.at, tz=timezone.utc).isoformat(timespec="seconds")
            if entry.at is not None
            else "-"
        )
        try:
            payload = json.loads(entry.envelope.body).get("args", [None])[0]
            shown = json.dumps(payload, separators=(",", ":"))
        except (ValueError, AttributeError, IndexError):
            shown = repr(entry.envelope.body[:200])
        click.echo(f"{entry.id}  {when}  {entry.key}  {shown}")


@stream.command()
@app_option
@click.argument("name")
@click.option("--subscriber", required=True, help="The subscriber's queue (its group).")
@click.option("--from", "start", required=True, help="first, last, offset or ISO time.")
def replay(app_path: str, name: str, subscriber: str, start: str) -> None:
    """Set subscriber group SUBSCRIBER of stream NAME to read from --from again.

    Stop the group's workers first: a running one would commit over it.
    """
    app = load_app(app_path)
    spec = _spec(app.streams, name)
    groups = [s.queue for s in stream_subscriptions(app) if s.stream == name]
    if subscriber not in groups:
        raise click.UsageError(
            f"Stream {name!r} has no subscriber {subscriber!r} in this app "
            f"(its subscribers: {', '.join(groups) or 'none'})."
        )
    position = parse_position(start)
    try:
        app.transport.streams().rewind(spec, subscriber, position)
    except MQTasksError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        app.close()
    click.echo(f"{name}: group {subscriber} reads from {start} when its workers start.")
