"""``mqtasks revoke``: revoke tasks by id, so that no worker runs them (``--terminate``:
and stop them where they run)."""

from __future__ import annotations

import os

import click

from ..config import mask_url
from ..exceptions import ConfigurationError, MQTasksError
from ..result import REVOKED
from ..revoke import check_task_id, revocation_backend, revoke
from . import app_option, cli, configure_logging, load_app

__all__ = ["REVOKE_EPILOG", "revoke_command"]

#: The end of ``mqtasks revoke --help``: examples and exit codes.
REVOKE_EPILOG = """\b
Examples:
  mqtasks revoke -A myapp 3f2c... 9a41...      # neither runs; both are dead-lettered
  mqtasks revoke -A myapp 3f2c... --terminate  # and stop it where it runs now

\b
A revoked task that reaches a worker is dead-lettered with the reason
"revoked"; its result reads REVOKED. Revocations are kept in the result
backend for revoke_expires seconds (a day by default). Replaying the dead
letter (mqtasks dlq replay) runs the task after all.

\b
Exit codes:
  0  every task is revoked (also one that had ended already, or was never sent)
  1  the result backend is unreachable or refused
  2  bad command line: -A naming no app, an app without a result backend, a bad id
"""


@cli.command(name="revoke", epilog=REVOKE_EPILOG)
@app_option
@click.argument("task_ids", metavar="TASK_ID...", nargs=-1, required=True)
@click.option(
    "--terminate", is_flag=True, help="Also stop each task where it is running (as a hard limit)."
)
def revoke_command(app_path: str, task_ids: tuple[str, ...], terminate: bool) -> None:
    """Revoke the tasks TASK_ID...: workers dead-letter them instead of running them."""
    # Warnings to stderr; what was revoked is what stdout says.
    configure_logging("warning", os.environ.get("MQTASKS_LOG_FORMAT") or "auto")
    for task_id in task_ids:
        try:
            check_task_id(task_id)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="TASK_ID") from exc
    app = load_app(app_path)
    try:
        revocation_backend(app)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc
    url = mask_url(app.settings.backend_url or "")
    try:
        for task_id in task_ids:
            state = revoke(app, task_id, terminate=terminate)
            note = " (terminate)" if terminate else ""
            if state != REVOKED:
                note += f" (it had ended already: {state})"
            click.echo(f"revoked {task_id}{note}")
    except MQTasksError as exc:
        message = str(exc) if url in str(exc) else f"{exc} (result backend {url})"
        raise click.ClickException(message) from exc
    finally:
        app.close()
