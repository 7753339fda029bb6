"""The app the credential-redaction tests run ``mqtasks worker -A`` on.

The broker URL and the default queue come from the environment
(``MQTASKS_BROKER_URL``, ``MQTASKS_DEFAULT_QUEUE``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mqtasks import App

app = App("redaction")


@app.task(name="redaction.leak", max_retries=0)
def leak() -> None:
    """Fail with an error that quotes the broker URL and its password."""
    url = app.settings.broker_url
    raise RuntimeError(f"lost the broker at {url} (password {urlsplit(url).password})")
