"""What RabbitMQ tells only through its management plugin's HTTP API.

A passive ``queue.declare`` gives ready messages and consumers; unacknowledged
messages, the publishing time of the head message and message rates come from
``GET /api/queues/<vhost>/<name>`` of the management plugin
(``rabbitmq-plugins enable rabbitmq_management``). When the plugin is not
enabled, not reachable or refuses, those counts stay unknown (``None``): they
are never estimated.

The API's figures are those of the broker's last statistics collection (every
5 s by default), so they trail the passive counts by up to that long.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from ..._url import mask_url, redact, remember_secret

__all__ = [
    "DEFAULT_MANAGEMENT_PORT",
    "MANAGEMENT_TIMEOUT",
    "count",
    "head_timestamp",
    "management_url",
    "rate",
    "read_queues",
    "vhost_of",
]

logger = logging.getLogger("mqtasks.transport.amqp.management")

#: Port of the management plugin's HTTP listener unless configured otherwise.
DEFAULT_MANAGEMENT_PORT = 15672
#: Seconds one request to the management API may take; status must not hang on it.
MANAGEMENT_TIMEOUT = 2.0
#: Largest response read, in bytes: one queue's object is a few kilobytes.
_MAX_RESPONSE = 1024 * 1024

#: Settings values that turn the management API off.
_OFF = frozenset({"off", "none", "false", "0"})


#: One queue object of the management API, as decoded from its JSON.
QueueFigures = dict[str, Any]


def management_url(broker_url: str, configured: str | None = None) -> str | None:
    """Return the management API's base URL, with credentials, or None when turned off.

    Args:
        broker_url: The ``amqp://``/``amqps://`` broker URL; its host and
            credentials make the default ``http://user:password@host:15672``.
        configured: The ``rabbitmq_management_url`` setting: a URL (credentials
            in it win; without any, the broker's are used), ``"off"`` to not ask,
            or ``None`` for the default.
    """
    if configured is not None and configured.strip().lower() in _OFF:
        return None
    broker = urlsplit(broker_url)
    user = unquote(broker.username) if broker.username else "guest"
    password = unquote(broker.password) if broker.password else "guest"
    if configured:
        parts = urlsplit(configured)
        if parts.username:
            remember_secret(configured)  # masked wherever it might be logged
            return configured.rstrip("/")
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.netloc}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")
    host = broker.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if broker.scheme in ("amqps",) else "http"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}:{DEFAULT_MANAGEMENT_PORT}"
    return f"{scheme}://{netloc}"


def vhost_of(broker_url: str) -> str:
    """Return the virtual host a broker URL names (``/`` when it names none)."""
    path = urlsplit(broker_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def read_queues(
    base_url: str, vhost: str, names: Sequence[str], *, timeout: float = MANAGEMENT_TIMEOUT
) -> dict[str, QueueFigures] | None:
    """Return the management API's object for each queue that it knows, by name.

    A queue the API does not know (yet: it appears with the next statistics
    collection) is left out.

    Args:
        base_url: From :func:`management_url` (credentials in it).
        vhost: The virtual host (``/`` for the default one).
        names: Queue names.
        timeout: Seconds each request may take.

    Returns:
        The objects, or None if the API cannot be reached or refuses (the plugin
        is not enabled, wrong credentials): every figure it would give is then
        unknown. The reason is logged at debug level with the password masked.
    """
    parts = urlsplit(base_url)
    auth = ""
    if parts.username is not None:
        raw = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(raw.encode()).decode()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    root = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    found: dict[str, QueueFigures] = {}
    for name in names:
        url = f"{root}/api/queues/{quote(vhost, safe='')}/{quote(name, safe='')}"
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        if auth:
            request.add_header("Authorization", auth)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read(_MAX_RESPONSE)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                continue
            _unknown(base_url, f"HTTP {exc.code}")
            return None
        except (OSError, ValueError) as exc:
            _unknown(base_url, f"{type(exc).__name__}: {exc}")
            return None
        try:
            data = json.loads(body)
        except ValueError:
            _unknown(base_url, "not a JSON answer")
            return None
        if isinstance(data, dict):
            found[name] = data
    return found


def _unknown(base_url: str, reason: str) -> None:
    logger.debug(
        "status.management_unavailable url=%s reason=%s",
        mask_url(base_url),
        redact(reason),
    )


def count(figures: Mapping[str, Any] | None, key: str) -> int | None:
    """Return a whole count of ``figures`` (``messages_unacknowledged``...), or None."""
    value = None if figures is None else figures.get(key)
    return value if type(value) is int and value >= 0 else None


def rate(figures: Mapping[str, Any] | None, stat: str) -> float | None:
    """Return ``message_stats.<stat>_details.rate`` (per second), or None.

    A queue that saw no such operation since the statistics began reports no
    ``<stat>`` at all; its rate is then 0 when the queue has any statistics,
    as the API itself shows it.
    """
    if figures is None:
        return None
    stats = figures.get("message_stats")
    if not isinstance(stats, dict):
        return 0.0 if "messages" in figures else None
    details = stats.get(stat + "_details")
    if not isinstance(details, dict):
        return 0.0
    value = details.get("rate")
    if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def head_timestamp(figures: Mapping[str, Any] | None) -> float | None:
    """Return ``head_message_timestamp`` (seconds since the epoch), or None.

    RabbitMQ reports it for classic queues whose head message carries the AMQP
    timestamp property; quorum queues do not report it.
    """
    value = None if figures is None else figures.get("head_message_timestamp")
    return float(value) if type(value) is int and value > 0 else None
