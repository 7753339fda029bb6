"""``mqtasks result``: the state and value (or failure) of one task, from the result backend."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import click

from ..config import mask_url
from ..exceptions import ConfigurationError, MQTasksError, ResultTimeout
from ..result import PENDING, Outcome, fetch_outcome, wait_outcome
from . import app_option, cli, load_app

__all__ = ["RESULT_EPILOG", "RET_FAILED", "RET_NOT_READY", "result"]

#: Exit code when the task ended without a value (failed, dead-lettered, revoked).
RET_FAILED = 3
#: Exit code when the task has no final outcome (yet, or after ``--wait``).
RET_NOT_READY = 4

#: The end of ``mqtasks result --help``: examples and exit codes.
RESULT_EPILOG = """\b
Examples:
  mqtasks result -A myapp 3f2c...            # the state now, and the value if any
  mqtasks result -A myapp 3f2c... --wait 30  # wait up to 30 s for the result
  mqtasks result -A myapp 3f2c... --json | jq .value

\b
States:
  PENDING        nothing stored: queued, unknown, expired or forgotten
  STARTED        running (tasks with track_started=True)
  RETRYING       an attempt failed; the next one is scheduled
  SUCCEEDED      returned; the value is shown
  FAILED         no value: it could not be stored, or a workflow step failed
  DEAD_LETTERED  in the dead-letter queue, with the reason and the error
  REVOKED        revoked before it ran

\b
Exit codes:
  0  the task SUCCEEDED
  1  the result backend is unreachable or refused
  2  bad command line, including -A naming no app and an app without a backend
  3  the task ended without a value (FAILED, DEAD_LETTERED, REVOKED)
  4  no final outcome yet (PENDING, STARTED, RETRYING; after --wait: none in time)
"""


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _text(task_id: str, outcome: Outcome | None) -> str:
    if outcome is None:
        return f"{task_id}  {PENDING}  (nothing stored yet)"
    head = f"{task_id}  {outcome.state}"
    if outcome.task:
        head += f"  task={outcome.task}"
    head += f"  at={_when(outcome.at)}"
    lines = [head]
    if outcome.succeeded:
        lines.append("value: " + json.dumps(outcome.value, ensure_ascii=False))
    if outcome.failed_task_id and outcome.failed_task_id != task_id:
        lines.append(f"failed task: {outcome.failed_task_id}")
    if outcome.reason:
        lines.append(f"reason: {outcome.reason}")
    if outcome.error_type or outcome.error_message:
        lines.append(f"error: {outcome.error_type or ''}: {outcome.error_message or ''}")
    if outcome.traceback:
        lines.append("traceback:\n" + outcome.traceback.rstrip())
    return "\n".join(lines)


@cli.command(epilog=RESULT_EPILOG)
@app_option
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON document.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Wait up to SECONDS for a final outcome (succeeded, failed...).",
)
def result(app_path: str, task_id: str, as_json: bool, wait: float | None) -> None:
    """Show the state of task TASK_ID and its value, or how it failed."""
    app = load_app(app_path)
    try:
        backend = app.backend
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc
    url = mask_url(app.settings.backend_url or "")
    try:
        if wait is None:
            outcome = fetch_outcome(backend, task_id)
        else:
            try:
                outcome = wait_outcome(backend, task_id, wait)
            except ResultTimeout:
                outcome = fetch_outcome(backend, task_id)
    except MQTasksError as exc:
        message = str(exc) if url in str(exc) else f"{exc} (result backend {url})"
        raise click.ClickException(message) from exc
    finally:
        app.close()
    if as_json:
        document = {"id": task_id, **(outcome.to_dict() if outcome else {"state": PENDING})}
        click.echo(json.dumps(document, ensure_ascii=False))
    else:
        click.echo(_text(task_id, outcome))
    if outcome is None or not outcome.final:
        click.get_current_context().exit(RET_NOT_READY)
    elif outcome.failed:
        click.get_current_context().exit(RET_FAILED)
