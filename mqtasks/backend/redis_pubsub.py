"""The Redis backend's revocation watch: SUBSCRIBE to its channel, check the line with PING.

A subscribed connection that the network silently dropped (a black hole)
would wait forever; PING every few seconds, and a missing answer counts as a
lost connection, so the watch connects again and the worker reads the stored
revocations again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis

from .base import RevocationListener
from .watch import POLL, Listen, decode_notice

__all__ = ["listen_pubsub"]

#: Seconds between two PINGs on the subscribed connection.
_PING = 5.0
#: Seconds without any message (a PONG at least) after which the connection counts as lost.
_SILENT = 15.0


def listen_pubsub(client: Callable[[], redis.Redis[bytes]], channel: str) -> Listen:
    """Return the listen function of a :class:`~mqtasks.backend.watch.WatchThread` on ``channel``.

    Args:
        client: Returns the backend's client (a new one after the backend was closed).
        channel: The channel revocations are published on.
    """

    def listen(stopping: threading.Event, listener: RevocationListener) -> None:
        pubsub = client().pubsub()
        try:
            pubsub.subscribe(channel)
            heard = pinged = time.monotonic()
            while not stopping.is_set():
                message = pubsub.get_message(timeout=POLL)
                now = time.monotonic()
                if message is not None:
                    heard = now
                    if message["type"] == "subscribe":
                        listener.on_watch_connected()
                    elif message["type"] == "message":
                        decode_notice(message["data"], listener)
                if now - heard > _SILENT:
                    raise ConnectionError(f"Redis did not answer a PING for {_SILENT:g} s")
                if now - pinged > _PING:
                    pubsub.ping()
                    pinged = now
        finally:
            pubsub.close()

    return listen
