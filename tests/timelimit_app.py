"""The app ``tests/test_timelimits.py`` runs with ``mqtasks worker --processes 2``: the
tasks of ``tests/cli_app.py`` (configured from the same environment) and two that hang
past their hard time limit, one in a loop and one blocked in C."""

from __future__ import annotations

import time

from mqtasks import App
from tests.cli_app import make_app, transport_options_from_env

#: Name of the task that never ends (``time.sleep(3600)``, which no exception interrupts).
HANG = "tl.hang"
#: Name of the task that loops forever in Python.
SPIN = "tl.spin"
#: Its hard time limit, in seconds.
LIMIT = 1.0


def add_hung_tasks(app: App) -> App:
    """Register :data:`HANG` and :data:`SPIN` on ``app`` (the worker's, or a publisher's)."""

    @app.task(name=HANG, time_limit=LIMIT)
    def hang() -> None:
        time.sleep(3600)

    @app.task(name=SPIN, time_limit=LIMIT)
    def spin() -> None:
        while True:
            pass

    return app


#: The app the worker subprocess loads.
app = add_hung_tasks(make_app(transport_options=transport_options_from_env()))
