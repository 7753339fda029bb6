"""The app ``tests/test_flow_wiring.py`` points ``mqtasks status`` at: limits and a circuit.

In-process only (``memory://`` broker and backend): the test runs the command
with click's runner and reads the same backend.
"""

from __future__ import annotations

from mqtasks import App, CircuitBreaker

app = App(
    "flow_status",
    broker="memory://",
    backend="memory://",
    default_queue="mqt-flow-status",
    circuits=[CircuitBreaker("partner", failure_threshold=3)],
)


@app.task(rate_limit="10/s", circuit="partner")
def call_partner(order_id: int) -> None:
    """A rate-limited task behind the circuit."""


@app.task(concurrency_limit=5)
def heavy_export(report_id: int) -> None:
    """A task limited to five at once across workers."""


@app.task(rate_limit="2/m", rate_key="user_id")
def notify(user_id: int) -> None:
    """A rate limit per user."""
