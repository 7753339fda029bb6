"""End to end: headless Chromium drives the dashboard of an app on a real broker.

The page polls the dashboard, which samples the broker: a queue's depth
changes on the page as tasks are sent; a dead letter replayed from the page
(with its confirmation step) runs on a worker.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mqtasks import App
from mqtasks.testing import running_worker
from tests._helpers.brokers import require_broker
from tests._helpers.wait import WAIT, wait_for
from tests.dashboard.browser import CHROMIUM, launch_chromium, serve

pytestmark = pytest.mark.integration

#: Milliseconds a page expectation may take before the test fails.
EXPECT_MS = WAIT * 1000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium; skipped where it is missing, but failing under CI."""
    if not os.path.exists(CHROMIUM):
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI requires it", pytrace=False)
        pytest.skip(message)
    with launch_chromium() as chromium:
        yield chromium


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser page (its own cookies)."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.set_default_timeout(EXPECT_MS)
    yield page
    context.close()


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_queue_depth_changes_on_the_page_as_tasks_are_sent(
    broker: str, make_app: Callable[..., App], page: Any
) -> None:
    from playwright.sync_api import expect

    app = make_app(require_broker(broker))

    @app.task(name="dashboard.add")
    def add(x: int, y: int) -> int:
        return x + y

    queue = app.settings.default_queue
    app.declare()
    with serve(app, sample_interval=0.5) as url:
        page.goto(f"{url}/queues")
        ready = page.locator(f'tr[data-queue="{queue}"] td[data-field="ready"]')
        expect(ready).to_have_text("0", timeout=EXPECT_MS)

        # When tasks are sent, the page shows them waiting, without a reload.
        for i in range(3):
            add.delay(i, i)
        expect(ready).to_have_text("3", timeout=EXPECT_MS)
        for i in range(2):
            add.delay(i, i)
        expect(ready).to_have_text("5", timeout=EXPECT_MS)

        # And the live chart has drawn the ready line.
        chart = page.locator(f'figure[data-queue="{queue}"] polyline.ready')
        expect(chart.first).to_be_attached(timeout=EXPECT_MS)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_dead_letter_replayed_from_the_page_runs_on_a_worker(
    broker: str, make_app: Callable[..., App], page: Any
) -> None:
    from playwright.sync_api import expect

    app = make_app(require_broker(broker))
    runs: list[int] = []
    ran_again = threading.Event()

    @app.task(name="dashboard.flaky", max_retries=0)
    def flaky(n: int) -> int:
        runs.append(n)
        if len(runs) == 1:
            raise RuntimeError("the first run fails")
        ran_again.set()
        return n

    queue = app.settings.default_queue
    with running_worker(app), serve(app, sample_interval=0.5) as url:
        # Given a dead letter (the first run failed, with no retries left),
        handle = flaky.delay(7)
        wait_for(lambda: [e.id for e in app.dead_letters()] == [handle.id], "the dead letter")

        # when it is replayed from the page, after the confirmation step,
        page.goto(f"{url}/dead/{queue}")
        row = page.locator(f'tr[data-id="{handle.id}"]')
        expect(row).to_contain_text("RuntimeError: the first run fails")
        row.get_by_role("link", name="Replay").click()
        expect(page.locator("h1")).to_have_text(f"Replay 1 dead letter of {queue}?")
        assert not ran_again.is_set()  # nothing happens before the confirmation
        page.locator("#confirm").click()

        # then the progress shows it done, and the worker runs it.
        expect(page.locator("#job-status")).to_have_text("Done: 1.")
        assert ran_again.wait(WAIT), "the replayed task did not run"
        assert runs == [7, 7]
        page.get_by_role("link", name="Back to the dead letters").click()
        expect(page.locator("#no-dead-letters")).to_be_visible()
