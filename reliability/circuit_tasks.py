"""The circuit scenario's app (S20): one task behind a circuit breaker, and its dependency.

Workers run it as ``python -m mqtasks worker -A reliability.circuit_tasks``; it
reads the environment :mod:`reliability.tasks` reads, plus
``MQTASKS_BACKEND_URL`` and ``MQTASKS_BACKEND_KEY_PREFIX`` (circuits keep their
state in the result backend) and ``RELIABILITY_OUTAGE_FILE``: while that file
exists the dependency is down, and :data:`CALL` raises :exc:`ConnectionError`.

:data:`CALL` ``(task_id, ms)`` runs behind the circuit :data:`CIRCUIT`; its body
writes the ledger (``start`` at entry, ``done`` after it returned, with the
attempt number), so a run that failed because of the outage has a ``start`` and
no ``done``, and a task deferred while the circuit was open has neither.
"""

from __future__ import annotations

import os
import time

from mqtasks import App, CircuitBreaker
from mqtasks.middleware.circuits import Circuits

from .app_env import app_options, lazy_app, queue_spec, run_queue
from .workflow_tasks import _Ledger

__all__ = ["CALL", "CIRCUIT", "FAILURE_THRESHOLD", "MAX_RETRIES", "build_circuit_app"]

#: The task's and the circuit's names.
CALL = "rel.circuit.call"
CIRCUIT = "dependency"
#: The breaker: failures within WINDOW s that open it; seconds open before a probe.
FAILURE_THRESHOLD = 5
WINDOW = 10.0
RESET_TIMEOUT = 2.0
#: Retries of a failed run, one second apart: enough for a task that fails once
#: before the circuit opens and as a probe or two, never for every probe of an outage.
MAX_RETRIES = 10
RETRY_BACKOFF = 1.0


def build_circuit_app(environ: dict[str, str] | None = None) -> App:
    """Build the circuit scenario's app from ``environ`` (``os.environ`` by default)."""
    env = dict(os.environ if environ is None else environ)
    options = app_options(env)
    rel = App(
        "reliability-circuits",
        queues=[queue_spec(env, run_queue(env))],
        circuits=[
            CircuitBreaker(
                CIRCUIT,
                failure_threshold=FAILURE_THRESHOLD,
                window=WINDOW,
                reset_timeout=RESET_TIMEOUT,
                trip_on=(ConnectionError,),
            )
        ],
        **options,
    )
    ledger = _Ledger(env.get("RELIABILITY_LEDGER_DIR"))
    outage = env.get("RELIABILITY_OUTAGE_FILE")

    @rel.task(
        name=CALL,
        circuit=CIRCUIT,
        max_retries=MAX_RETRIES,
        retry_backoff=RETRY_BACKOFF,
        ignore_result=True,
    )
    def call(task_id: str, ms: float) -> None:
        """Call the dependency: ConnectionError while it is down, else sleep ``ms`` ms."""
        ledger.record("start", task_id)
        if outage is not None and os.path.exists(outage):
            raise ConnectionError("the dependency is down (RELIABILITY_OUTAGE_FILE exists)")
        if ms > 0:
            time.sleep(ms / 1000.0)
        ledger.record("done", task_id)

    # The app installs Circuits itself, so that it runs whether or not the worker
    # adds one (a worker's Circuits.for_app adds none to an app that has one).
    circuits = Circuits.for_app(rel)
    if circuits is not None:
        rel.middleware.append(circuits)
    return rel


#: ``app``, the app ``-A`` loads, built on first use.
__getattr__ = lazy_app(__name__, build_circuit_app)
