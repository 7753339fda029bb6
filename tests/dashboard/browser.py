"""Serving a dashboard from a thread, and the headless Chromium that drives it.

The browser tests and ``tests/dashboard/screenshots.py`` share these: uvicorn
serves :func:`mqtasks.dashboard.create_app` on a free loopback port in a
thread, and Playwright drives Debian's ``chromium`` package.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from mqtasks import App
from mqtasks.dashboard import create_app
from tests._helpers.wait import wait_for

__all__ = ["CHROMIUM", "launch_chromium", "serve"]

#: Debian's chromium (``apt-get install chromium``; ``.ci/run`` installs it).
CHROMIUM = os.environ.get("MQTASKS_TEST_CHROMIUM", "/usr/bin/chromium")


@contextlib.contextmanager
def serve(app: App, **options: Any) -> Iterator[str]:
    """Serve the dashboard of ``app`` on a free loopback port; yield its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    config = uvicorn.Config(
        create_app(app, **options), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dashboard-server", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), "the dashboard to start")
        assert server.started, "the dashboard server did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextlib.contextmanager
def launch_chromium() -> Iterator[Any]:
    """Yield a headless Chromium (a Playwright ``Browser``), closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()
