"""``mqtasks declare``: create on the broker every queue, exchange and binding an app names.

Workers declare what they consume when they start; this command does it
ahead of them (in a deploy step), so that events emitted before the first
worker of a subscriber starts wait in its queue.
"""

from __future__ import annotations

import click

from .._url import redact
from ..config import mask_url
from ..events import stale_bindings
from ..exceptions import MQTasksError
from ..transport.base import DLQ_SUFFIX
from . import app_option, cli, load_app, table

__all__ = ["DECLARE_EPILOG", "declare"]

#: The end of ``mqtasks declare --help``: examples and exit codes.
DECLARE_EPILOG = """\b
Examples:
  mqtasks declare -A myapp              # every queue, the events exchange, every binding
  MQTASKS_BROKER_URL=amqp://... mqtasks declare -A myapp

\b
Declared (each idempotently: what exists already is left as it is):
  - the queue of every task and subscriber, and every configured queue,
    each with its dead-letter queue (QUEUE.dlq);
  - the events exchange (MQTASKS_EVENTS_EXCHANGE, a durable topic exchange)
    and one binding per subscriber (@app.on), when the app has subscribers.
  Listed as "stale": other bindings on the subscribers' queues (an old
  pattern, still routing its events there), where the broker can list them
  (redis://; RabbitMQ cannot over AMQP). Nothing is removed.

\b
Exit codes:
  0  everything was declared
  1  the broker is unreachable or refused a declaration, or it cannot
     route events and the app has subscribers
  2  bad command line, including -A naming no app
"""


@cli.command(epilog=DECLARE_EPILOG)
@app_option
def declare(app_path: str) -> None:
    """Declare the app's queues, dead-letter queues, events exchange and bindings."""
    app = load_app(app_path)
    queues = list(dict.fromkeys([*app.task_queues(), *app.queues]))
    try:
        if len(app.subscriptions):
            app.transport.require_exchanges()  # before anything is declared
        app.declare(queues)
        subscriptions = app.declare_events()
        stale = stale_bindings(app, subscriptions) if subscriptions else []
    except MQTasksError as exc:
        broker = mask_url(app.settings.broker_url)
        raise click.ClickException(f"{redact(str(exc))} (broker {broker})") from exc
    finally:
        app.close()
    click.echo(f"Declared on {mask_url(app.settings.broker_url)}:")
    rows = [["queue", q, f"dead letters: {q}{DLQ_SUFFIX}"] for q in queues]
    if subscriptions:
        exchange = app.settings.events_exchange
        rows.append(["exchange", exchange, "topic, durable"])
        rows += [
            ["binding", f"{s.pattern} -> {s.queue}", f"subscriber {s.task.name}"]
            for s in subscriptions
        ]
        rows += [
            ["stale", f"{pattern} -> {queue}", "bound, but no subscriber declares it"]
            for pattern, queue in stale
        ]
    click.echo(table(rows, ["KIND", "NAME", "DETAIL"]))
