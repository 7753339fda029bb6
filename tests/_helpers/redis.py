"""The ``redis://`` transport driven by the test itself, on the local Redis.

Tests of the transport (fetching, delays, delivery counts) make a transport under
a key prefix of their own (:func:`key_prefix`), publish :func:`envelope` s and
consume them through an :class:`Inbox`, pumping its consumer as the worker's I/O
thread would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import redis

from mqtasks import QueueSpec
from mqtasks.transport import RedisTransport, resolve
from mqtasks.transport.base import Delivery
from mqtasks.transport.envelope import Envelope
from mqtasks.transport.redis import RedisConsumer

from .brokers import REDIS_URL, require_broker, unique_name
from .wait import wait_for

__all__ = [
    "FAST",
    "Inbox",
    "delete_keys",
    "envelope",
    "key_prefix",
    "make_transport",
    "pump_until",
    "reliable_url",
    "scan_pattern",
]

#: Liveness settings short enough for a test to see a dead consumer restored.
FAST = {"liveness_ttl": 1.0, "sweep_interval": 0.3}


def reliable_url(port: int | None = None) -> str:
    """The local Redis as a ``redis://`` URL, or the same database through ``port`` (a proxy)."""
    parts = urlsplit(REDIS_URL)
    netloc = parts.netloc if port is None else f"127.0.0.1:{port}"
    return parts._replace(scheme="redis", netloc=netloc).geturl()


def scan_pattern(key: str) -> str:
    """A SCAN pattern that matches ``key`` itself (its hash-tag braces escaped)."""
    return key.replace("{", "[{]").replace("}", "[}]")


def delete_keys(prefix: str) -> None:
    """Delete every key of the local Redis that starts with ``prefix``."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=scan_pattern(prefix) + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@contextmanager
def key_prefix(name: str) -> Iterator[str]:
    """A key prefix (hash tag) no other test uses; its keys are deleted on exit.

    Skips the test when the local Redis is unreachable (fails under ``CI``).
    """
    require_broker("redis")
    tag = "{" + unique_name(name) + "}"
    try:
        yield tag
    finally:
        delete_keys(tag)


def envelope(n: int, **kwargs: Any) -> Envelope:
    """Envelope number ``n``: body ``{"n": n}``, message id ``m<n>``."""
    return Envelope(body=b'{"n":%d}' % n, message_id=f"m{n}", **kwargs)


def make_transport(prefix: str, url: str | None = None, **options: Any) -> RedisTransport:
    """A ``redis://`` transport on the local Redis (or ``url``) under key prefix ``prefix``."""
    opts = {"key_prefix": prefix, **options.pop("transport_options", {})}
    transport = resolve(url or reliable_url(), transport_options=opts, **options)
    assert isinstance(transport, RedisTransport)
    return transport


class Inbox:
    """A consumer driven by the test itself, as the worker's I/O thread would."""

    def __init__(self, transport: RedisTransport, queues: list[str], prefetch: int):
        self.got: list[Delivery] = []
        consumer = transport.consumer([QueueSpec(q) for q in queues], prefetch=prefetch)
        assert isinstance(consumer, RedisConsumer)
        self.consumer = consumer
        consumer.start(self.got.append)

    @property
    def proc(self) -> str:
        """The processing list of the first queue."""
        return self.consumer.proc_key(self.consumer._sources[0])

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> None:
        """Let the consumer fetch until ``until()`` holds (failing after ``timeout`` s)."""
        pump_until(until, [self], timeout)

    def ids(self) -> list[str | None]:
        """Message ids of the deliveries so far, in order."""
        return [d.message_id for d in self.got]


def pump_until(until: Callable[[], bool], inboxes: list[Inbox], timeout: float = 10.0) -> None:
    """Let each of ``inboxes`` fetch in turn until ``until()`` holds (failing after ``timeout`` s)."""

    def step() -> bool:
        if until():
            return True
        for inbox in inboxes:
            inbox.consumer.wait(0.05, -1)
        return False

    def state() -> str:
        return "the deliveries to arrive; got " + "; ".join(str(i.ids()) for i in inboxes)

    # Each step blocks in the consumers for up to 0.05 s: no pause between steps.
    wait_for(step, state, timeout, interval=0)
