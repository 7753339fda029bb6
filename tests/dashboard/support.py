"""Helpers of the dashboard tests: the test client class, sampling now, a form's CSRF token."""

from __future__ import annotations

import re
import warnings

with warnings.catch_warnings():
    # Starlette asks for httpx2 where httpx is installed; the client works the same.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

__all__ = ["TestClient", "csrf_token", "sample"]


def sample(client: TestClient) -> None:
    """Make the dashboard of ``client`` sample its queues now."""
    client.app.state.dashboard.sampler.sample()  # type: ignore[attr-defined]


def csrf_token(html: str) -> str:
    """Return the CSRF token of the (first) form in ``html``."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)
