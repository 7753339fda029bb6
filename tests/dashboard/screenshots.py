"""Take the screenshots of the dashboard guide: ``python -m tests.dashboard.screenshots``.

Runs by hand (not collected by pytest): an example shop app on the local Redis
(broker and result backend) gets some traffic, a few failures and a worker;
headless Chromium then saves the queues, workers, dead letters and task
detail pages as PNGs into ``docs/_static/dashboard/``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from mqtasks import App
from mqtasks.control_agent import ControlAgent
from mqtasks.testing import running_worker
from mqtasks.transport.base import dead_letter_spec
from tests._helpers.brokers import REDIS_URL, unique_name
from tests._helpers.wait import wait_for
from tests.dashboard.browser import launch_chromium, serve

#: Where the guide expects the pictures.
OUT = Path(__file__).resolve().parents[2] / "docs" / "_static" / "dashboard"


class CardDeclined(Exception):
    """The payment provider said no."""


def make_shop() -> App:
    """The example app: three queues, one task that fails for some cards."""
    app = App(
        "shop",
        broker=REDIS_URL,
        backend=REDIS_URL,
        default_queue=unique_name("default"),
        backend_key_prefix=unique_name("shots") + ":",
    )
    # Plain names read better in the pictures; cleanup() below deletes them.
    emails, reports, payments = "shop.emails", "shop.reports", "shop.payments"

    @app.task(name="shop.send_receipt", queue=emails)
    def send_receipt(order: int) -> str:
        time.sleep(0.02)
        return f"receipt {order} sent"

    @app.task(name="shop.build_report", queue=reports)
    def build_report(day: str) -> dict[str, Any]:
        return {"day": day, "orders": 128, "revenue": 5312.4}

    @app.task(name="shop.charge_card", queue=payments, max_retries=0)
    def charge_card(order: int, amount: float) -> dict[str, Any]:
        if order % 3 == 0:
            raise CardDeclined(f"card of order {order} declined: insufficient funds")
        return {"order": order, "charged": amount}

    return app


def traffic(app: App) -> tuple[str, str]:
    """Send work and fail some; return a dead-letter queue name and a failed task id."""
    receipt = app.tasks["shop.send_receipt"]
    report = app.tasks["shop.build_report"]
    charge = app.tasks["shop.charge_card"]
    payments = charge.queue
    failed = ""
    for order in range(1, 10):
        handle = charge.delay(order, 19.9 + order)
        failed = handle.id if order % 3 == 0 else failed
    for i in range(30):  # the emails queue backs up, then the worker drains it
        for order in range(i * 3, i * 3 + 3):
            receipt.delay(order)
        if i % 6 == 0:
            report.delay(f"2026-12-0{1 + i // 6}")
        time.sleep(0.4)
    return payments, failed


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    app = make_shop()
    try:
        app.declare()
        with serve(app, sample_interval=1.0) as url:
            payments, failed = traffic(app)
            with running_worker(app, concurrency=4) as worker:
                agent = ControlAgent(worker)  # the workers page shows its heartbeats
                agent.start()
                wait_for(lambda: len(app.dead_letters(payments)) == 3, "the dead letters", 60)
                time.sleep(6)  # a few samples of the draining queue, and heartbeats
                with launch_chromium() as browser:
                    page = browser.new_page(viewport={"width": 1100, "height": 620})
                    shots = {
                        "queues": "/queues",
                        "workers": "/workers",
                        "dead-letters": f"/dead/{payments}",
                        "task-detail": f"/tasks/{failed}",
                    }
                    for name, path in shots.items():
                        page.goto(url + path)
                        if name == "queues":
                            page.wait_for_selector("polyline.ready")
                        page.screenshot(path=str(OUT / f"{name}.png"))
                        print(OUT / f"{name}.png")
                agent.stop()
    finally:
        names = app.task_queues()
        specs = [app.queue(n) for n in names]
        app.transport.delete(specs + [dead_letter_spec(s) for s in specs])
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
