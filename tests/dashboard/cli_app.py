"""The app ``mqtasks dashboard -A tests.dashboard.cli_app`` serves in the CLI tests (memory broker)."""

from __future__ import annotations

from mqtasks import App

app = App("dashboard-cli", broker="memory://")


@app.task(queue="dashboard-cli")
def noop() -> None:
    """Give the app a task queue to show."""
