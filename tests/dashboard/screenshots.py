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
        time.sleep(0.3)
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


def fail_payments(app: App) -> str:
    """Charge nine orders, three of which fail for good; return the id of one that failed."""
    failed = ""
    for order in range(1, 10):
        handle = app.tasks["shop.charge_card"].delay(order, 19.9 + order)
        failed = handle.id if order % 3 == 0 else failed
    return failed


def back_up(app: App) -> None:
    """Send receipts and reports for a while with nobody consuming them."""
    for i in range(24):
        for order in range(i * 4, i * 4 + 4):
            app.tasks["shop.send_receipt"].delay(order)
        if i % 6 == 0:
            app.tasks["shop.build_report"].delay(f"2026-12-0{1 + i // 6}")
        time.sleep(0.5)


def shoot(url: str, pages: dict[str, str]) -> None:
    """Save a PNG of each page, by name."""
    with launch_chromium() as browser:
        page = browser.new_page(viewport={"width": 1100, "height": 620})
        for name, path in pages.items():
            page.goto(url + path)
            if name == "queues":
                page.wait_for_selector("polyline.ready")
            page.screenshot(path=str(OUT / f"{name}.png"))
            print(OUT / f"{name}.png")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    app = make_shop()
    emails, reports, payments = app.task_queues()
    agents: list[ControlAgent] = []
    try:
        app.declare()
        # A worker on payments dead-letters three charges; emails and reports back up.
        with (
            serve(app, sample_interval=1.0) as url,
            running_worker(app, queues=[payments]) as first,
        ):
            agents.append(ControlAgent(first))  # the workers page shows heartbeats
            agents[-1].start()
            failed = fail_payments(app)
            back_up(app)
            # A second worker drains them, slowly: the pictures catch it halfway.
            with running_worker(app, queues=[emails, reports], concurrency=2) as second:
                agents.append(ControlAgent(second))
                agents[-1].start()
                wait_for(lambda: len(app.dead_letters(payments)) == 3, "the dead letters")
                time.sleep(3)
                shoot(url, {"queues": "/queues", "workers": "/workers"})
                shoot(
                    url,
                    {"dead-letters": f"/dead/{payments}", "task-detail": f"/tasks/{failed}"},
                )
                for agent in agents:
                    agent.stop()
    finally:
        specs = [app.queue(n) for n in app.task_queues()]
        app.transport.delete(specs + [dead_letter_spec(s) for s in specs])
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
