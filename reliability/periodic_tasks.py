"""The periodic scenario's app (S22): one task sent by ``mqtasks beat`` every second.

Workers run it as ``python -m mqtasks worker -A reliability.periodic_tasks`` and
the schedulers as ``python -m mqtasks beat -A reliability.periodic_tasks``; it
reads the environment :mod:`reliability.tasks` reads, plus
``MQTASKS_BACKEND_URL`` and ``MQTASKS_BACKEND_KEY_PREFIX`` (the leader lease,
the tick claims and the schedule's state live in the result backend) and
``RELIABILITY_PERIODIC_APP``: the app's name, one per run, so that the lease and
the claims of one run (``periodic:<app>:...``) are never another's.

:data:`TICK` runs every :data:`EVERY` s with ``catch_up="all"``: a tick missed
while no scheduler led is sent late, never skipped. Its body writes the ledger
under its own task id, which is the tick id (``periodic:<schedule>:<UTC time>``):
``start`` at entry, ``done`` at exit, so the ledger counts the runs of each tick.
"""

from __future__ import annotations

import os

from mqtasks import App, current_message

from .app_env import app_options, lazy_app, queue_spec, run_queue
from .workflow_tasks import _Ledger

__all__ = ["APP_NAME", "EVERY", "TICK", "build_periodic_app"]

#: The task's (and its schedule's) name.
TICK = "rel.periodic.tick"
#: Seconds between ticks.
EVERY = 1
#: The app's name when ``RELIABILITY_PERIODIC_APP`` is not set.
APP_NAME = "reliability-periodic"


def build_periodic_app(environ: dict[str, str] | None = None) -> App:
    """Build the periodic scenario's app from ``environ`` (``os.environ`` by default)."""
    env = dict(os.environ if environ is None else environ)
    rel = App(
        env.get("RELIABILITY_PERIODIC_APP") or APP_NAME,
        queues=[queue_spec(env, run_queue(env))],
        **app_options(env),
    )
    ledger = _Ledger(env.get("RELIABILITY_LEDGER_DIR"))

    @rel.periodic(every=EVERY, catch_up="all", name=TICK, task_name=TICK, ignore_result=True)
    def tick() -> None:
        """Record this run of the tick (its task id is the tick id)."""
        msg = current_message()
        if msg is None:  # called outside a worker: nothing to record
            return
        ledger.record("start", msg.id)
        ledger.record("done", msg.id)

    return rel


#: ``app``, the app ``-A`` loads, built on first use.
__getattr__ = lazy_app(__name__, build_periodic_app)
