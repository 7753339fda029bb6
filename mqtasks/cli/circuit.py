"""``mqtasks circuit``: force an app's circuit breakers open or closed, and list their state."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from ..config import mask_url
from ..exceptions import ConfigurationError, MQTasksError
from ..middleware.circuits import circuit_status, close_circuit, open_circuit
from . import cli, configure_logging, load_app, table

__all__ = ["CIRCUIT_EPILOG", "circuit_group", "circuit_table"]

#: The end of ``mqtasks circuit --help``: examples and exit codes.
CIRCUIT_EPILOG = """\b
Examples:
  mqtasks circuit -A myapp status               # each circuit's state
  mqtasks circuit -A myapp open payments        # hold it open until closed
  mqtasks circuit -A myapp open payments --for 300
  mqtasks circuit -A myapp close payments       # its tasks run again

\b
While a circuit is open its tasks are not run and not failed: workers defer
them (same attempt number). Forced open, it lets no probe through; with --for
it goes half-open after that many seconds, as after an automatic trip.
close also starts its failure count over.

\b
Exit codes:
  0  done
  1  the result backend is unreachable or refused
  2  bad command line: -A naming no app, an unknown circuit, an app without a result backend
"""


# -A goes before the subcommand (mqtasks circuit -A myapp open payments), as the
# issue writes it, or after it (mqtasks circuit open -A myapp payments), as the
# other commands take it.
_APP_HELP = "The app: module[:attribute]."
app_option = click.option("-A", "--app", "app_path", default=None, help=_APP_HELP)


@cli.group(name="circuit", epilog=CIRCUIT_EPILOG)
@app_option
@click.pass_context
def circuit_group(ctx: click.Context, app_path: str | None) -> None:
    """Force the app's circuit breakers open or closed, or show their state."""
    ctx.obj = app_path


def _run(action: str, name: str | None, for_seconds: float | None, app_path: str | None) -> None:
    # Warnings to stderr; what was done is what stdout says.
    configure_logging("warning", os.environ.get("MQTASKS_LOG_FORMAT") or "auto")
    app_path = app_path or click.get_current_context().obj
    if not app_path:
        raise click.UsageError("Missing option '-A' / '--app': the app, module[:attribute].")
    app = load_app(app_path)
    url = mask_url(app.settings.backend_url or "")
    try:
        if action == "open" and name is not None:
            open_circuit(app, name, for_seconds=for_seconds)
            held = f"for {for_seconds:g} s" if for_seconds is not None else "until closed"
            click.echo(f"circuit {name} forced open {held}")
        elif action == "close" and name is not None:
            close_circuit(app, name)
            click.echo(f"circuit {name} closed")
        else:
            _show(circuit_status(app), as_json=action == "json")
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc
    except MQTasksError as exc:
        message = str(exc) if url in str(exc) else f"{exc} (result backend {url})"
        raise click.ClickException(message) from exc
    finally:
        app.close()


def _show(rows: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rows))
    elif not rows:
        click.echo("the app declares no circuit")
    else:
        click.echo(circuit_table(rows))


def circuit_table(rows: list[dict[str, Any]]) -> str:
    """Lay out :func:`~mqtasks.middleware.circuits.circuit_status` rows as a table."""
    lines = [
        [
            str(r["name"]),
            str(r["state"]) + (" (forced)" if r["forced"] else ""),
            f"{r['failures']:g}/{r['failure_threshold']} in {r['window']:g} s",
            str(r["opened_at"] or "-"),
            str(r["half_open_at"] or "-"),
        ]
        for r in rows
    ]
    return table(lines, ["CIRCUIT", "STATE", "FAILURES", "OPENED AT", "HALF-OPEN AT"])


@circuit_group.command(name="open")
@app_option
@click.argument("name")
@click.option(
    "--for",
    "for_seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds to hold it open, then half-open (default: until closed).",
)
def open_command(app_path: str | None, name: str, for_seconds: float | None) -> None:
    """Force circuit NAME open: its tasks wait, none runs."""
    _run("open", name, for_seconds, app_path)


@circuit_group.command(name="close")
@app_option
@click.argument("name")
def close_command(app_path: str | None, name: str) -> None:
    """Close circuit NAME: its tasks run again."""
    _run("close", name, None, app_path)


@circuit_group.command(name="status")
@app_option
@click.option("--json", "as_json", is_flag=True, help="One JSON list of the circuits.")
def status_command(app_path: str | None, as_json: bool) -> None:
    """Show each circuit's state, failures in its window and when it opened."""
    _run("json" if as_json else "status", None, None, app_path)
