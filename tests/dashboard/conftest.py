"""Fixtures of the dashboard tests: a started dashboard of an app, as a test client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mqtasks import App
from mqtasks.dashboard import create_app
from tests.dashboard.support import TestClient


@pytest.fixture
def client_for() -> Iterator[Callable[..., TestClient]]:
    """A factory: a started dashboard of an app, as a test client (closed at teardown)."""
    clients: list[TestClient] = []

    def make(app: App, **options: Any) -> TestClient:
        options.setdefault("sample_interval", 60.0)  # the tests sample when they need to
        client = TestClient(create_app(app, **options), base_url="http://dash.test")
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
