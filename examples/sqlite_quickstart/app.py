"""The tasks of the SQLite quickstart, on a database file that needs no server.

Run a worker on them (from the repository root)::

    mqtasks worker -A examples.sqlite_quickstart.app

and send tasks from another shell in the same directory (or from a web app on
the same machine)::

    python -m examples.sqlite_quickstart.send

Both open ``sqlite_quickstart.db`` in the current directory, unless
``MQTASKS_BROKER_URL`` names another file (``sqlite:////var/lib/shop/tasks.db``).
"""

from __future__ import annotations

import os

from mqtasks import App

#: The broker: a file relative to the current directory (three slashes), or absolute (four).
BROKER_URL = os.environ.get("MQTASKS_BROKER_URL", "sqlite:///sqlite_quickstart.db")

app = App("sqlite_quickstart", broker=BROKER_URL)


@app.task
def make_thumbnail(photo_id: int) -> str:
    """Pretend to resize a photo; print what was done (on the worker's output)."""
    done = f"thumbnail of photo {photo_id} made"
    print(done, flush=True)
    return done


@app.task(max_retries=1, retry_backoff=0.5)
def charge_card(order_id: int) -> None:
    """Fail every time: retried once, 0.5 s later (the file holds the retry), then
    dead-lettered, where ``mqtasks dlq ls -A examples.sqlite_quickstart.app`` lists it."""
    print(f"charging order {order_id} failed", flush=True)
    raise RuntimeError(f"card of order {order_id} declined")
