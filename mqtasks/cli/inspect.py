"""``mqtasks inspect`` and ``mqtasks control``: ask the running workers, or command them.

Both send one request through the broker (see :mod:`mqtasks.control`) and
print the answers that come from the live workers within ``--timeout``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import click

from ..control import Inspector
from ..exceptions import ConfigurationError, MQTasksError
from . import app_option, cli, configure_logging, load_app

__all__ = ["CONTROL_EPILOG", "INSPECT_EPILOG", "RET_NO_ANSWER", "control", "inspect"]

#: Exit code: no worker answered within the timeout.
RET_NO_ANSWER = 3

_CODES = """\b
Exit codes:
  0  every worker that answered in time did so without an error
  1  the broker is unreachable, or a worker answered with an error
  2  bad command line: -A naming no app, a broker without remote control
     (redis+kombu://), a bad argument
  3  no worker answered within --timeout
"""

#: The end of ``mqtasks inspect --help``: examples and exit codes.
INSPECT_EPILOG = (
    """\b
Examples:
  mqtasks inspect -A myapp ping              # which workers are alive
  mqtasks inspect -A myapp stats --json      # their figures, as one JSON object
  mqtasks inspect -A myapp active --worker web-1:4242

"""
    + _CODES
)

#: The end of ``mqtasks control --help``: examples and exit codes.
CONTROL_EPILOG = (
    """\b
Examples:
  mqtasks control -A myapp pool-grow 4        # every worker: 4 more threads
  mqtasks control -A myapp cancel-consumer emails --worker web-1:4242
  mqtasks control -A myapp add-consumer emails
  mqtasks control -A myapp shutdown --worker web-1:4242

\b
shutdown stops a worker as SIGTERM does (under --processes, the whole worker:
its supervisor and every child), letting running tasks finish.

"""
    + _CODES
)

_timeout = click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds to wait for answers.",
)
_worker = click.option(
    "--worker", "destination", default=None, metavar="ID", help="Only this worker (its id)."
)
_json = click.option("--json", "as_json", is_flag=True, help="Print the answers as JSON.")


@cli.command(epilog=INSPECT_EPILOG)
@app_option
@click.argument("question", type=click.Choice(["ping", "active", "stats", "registered"]))
@_timeout
@_worker
@_json
def inspect(
    app_path: str, question: str, timeout: float, destination: str | None, as_json: bool
) -> None:
    """Ask every live worker (or one): ping, active, stats or registered."""
    answers = _ask(app_path, question, None, timeout, destination)
    _print(question, answers, as_json)
    _exit(answers, timeout)


@cli.command(epilog=CONTROL_EPILOG)
@app_option
@click.argument(
    "command",
    type=click.Choice(["shutdown", "pool-grow", "pool-shrink", "cancel-consumer", "add-consumer"]),
)
@click.argument("argument", required=False)
@_timeout
@_worker
@_json
def control(
    app_path: str,
    command: str,
    argument: str | None,
    timeout: float,
    destination: str | None,
    as_json: bool,
) -> None:
    """Command every live worker (or one): shutdown, pool-grow N, pool-shrink N,
    cancel-consumer QUEUE, add-consumer QUEUE."""
    value: str | int | None = argument
    if command == "shutdown":
        if argument is not None:
            raise click.UsageError("shutdown takes no argument.")
    elif argument is None:
        what = "N (threads)" if command.startswith("pool-") else "QUEUE"
        raise click.UsageError(f"{command} takes {what}.")
    elif command.startswith("pool-"):
        try:
            value = int(argument)
        except ValueError:
            raise click.BadParameter(f"{argument!r} is not a whole number.") from None
        if value < 1:
            raise click.BadParameter(f"{argument!r}: give at least 1 thread.")
    answers = _ask(app_path, command, value, timeout, destination)
    _print(command, answers, as_json)
    _exit(answers, timeout)


def _ask(
    app_path: str,
    command: str,
    argument: str | int | None,
    timeout: float,
    destination: str | None,
) -> dict[str, Any]:
    configure_logging("warning", os.environ.get("MQTASKS_LOG_FORMAT") or "auto")
    app = load_app(app_path)
    try:
        inspector = Inspector(app, timeout, destination=destination)
        return inspector.control(command, argument)
    except (ConfigurationError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    except MQTasksError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        app.close()


def _print(command: str, answers: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(answers, indent=2, sort_keys=True))
        return
    for worker_id, answer in answers.items():
        if isinstance(answer, dict) and set(answer) == {"error"}:
            click.echo(f"{worker_id}: error: {answer['error']}")
        elif command == "ping":
            click.echo(f"{worker_id}: {answer}")
        elif command == "registered":
            click.echo(f"{worker_id}: {len(answer)} tasks")
            for name in answer:
                click.echo(f"  {name}")
        elif command == "active":
            click.echo(f"{worker_id}: {len(answer)} running")
            now = time.time()
            for task in answer:
                took = now - float(task.get("started_at", now))
                click.echo(f"  {task.get('id')}  {task.get('task')}  for {took:.1f}s")
        elif isinstance(answer, dict):
            click.echo(f"{worker_id}:")
            for key, value in answer.items():
                click.echo(f"  {key}: {value}")
        else:
            click.echo(f"{worker_id}: {answer}")


def _exit(answers: dict[str, Any], timeout: float) -> None:
    if not answers:
        click.echo(f"No worker answered within {timeout:g} s.", err=True)
        raise SystemExit(RET_NO_ANSWER)
    if any(isinstance(a, dict) and set(a) == {"error"} for a in answers.values()):
        raise SystemExit(1)
