"""A metric of your own, as middleware: count the tasks that run longer than a threshold.

``SlowTasks`` adds the counter ``<prefix>.task.slow.<task>`` next to the built-in
metrics, and sends it through the app's :class:`~mqtasks.middleware.StatsdMetrics`
(same server, prefix and error handling). Run it with
``python examples/custom_metric.py``: it sends a few tasks to the embedded
``memory://`` broker, runs them in this process and prints what it sent to
StatsD (``MQTASKS_STATSD_URL``, ``statsd://127.0.0.1:8125/mqtasks`` by default;
nothing needs to listen there). ``mqtasks worker -A examples.custom_metric``
runs the same app as a worker.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from mqtasks import App, Message, Middleware, Worker
from mqtasks.middleware import StatsdMetrics
from mqtasks.middleware.statsd import sanitize

#: Where the metrics go when ``MQTASKS_STATSD_URL`` is not set.
DEFAULT_STATSD_URL = "statsd://127.0.0.1:8125/mqtasks"


class SlowTasks(Middleware):
    """Counts ``task.slow.<task>`` for each run longer than ``threshold`` seconds.

    Args:
        metrics: The app's StatsD middleware, to send through.
        threshold: Seconds above which a run counts as slow.
    """

    def __init__(self, metrics: StatsdMetrics, threshold: float) -> None:
        self.metrics = metrics
        self.threshold = threshold
        # Hooks of one message run in the worker thread that runs it.
        self._local = threading.local()

    def before_process(self, worker: Worker, message: Message) -> None:
        self._local.started = time.perf_counter()

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        started = getattr(self._local, "started", None)
        if started is not None and time.perf_counter() - started > self.threshold:
            self.metrics.incr(f"task.slow.{sanitize(message.task)}")


def make_app(statsd_url: str, broker: str = "memory://", threshold: float = 0.05) -> App:
    """The example app: the default middleware (with StatsD on) plus ``SlowTasks``."""
    app = App("custom_metric", broker=broker, statsd_url=statsd_url)
    metrics = next(m for m in app.middleware if isinstance(m, StatsdMetrics))
    app.middleware.append(SlowTasks(metrics, threshold))

    @app.task(name="reports.build")
    def build_report(seconds: float) -> str:
        """Pretend to build a report, taking ``seconds``."""
        time.sleep(seconds)
        return f"report built in {seconds} s"

    return app


app = make_app(
    os.environ.get("MQTASKS_STATSD_URL", DEFAULT_STATSD_URL),
    broker=os.environ.get("MQTASKS_BROKER_URL", "memory://"),
)


def main() -> None:
    from mqtasks.testing import drain

    build_report = app.tasks["reports.build"]
    for seconds in (0.0, 0.2, 0.01):
        build_report.delay(seconds)
    worker = Worker(app, concurrency=2)
    worker.start()
    try:
        drain(worker)
    finally:
        worker.stop()
        app.close()
    print(
        "sent 3 tasks; one ran longer than 0.05 s and was counted as mqtasks.task.slow.reports_build"
    )


if __name__ == "__main__":
    main()
