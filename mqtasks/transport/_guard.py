"""kombu message classes that refuse compressed bodies before kombu inflates them.

kombu's ``Message.__init__`` decompresses any body whose headers carry
``compression``, before a consumer can look at it: a small hostile message can
expand to hundreds of MiB in the worker. No kombu option turns that off, so
these subclasses drop the header first and mark the message refused; the worker
then rejects it with reason ``compression_refused`` without touching the body.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import pyamqp
from kombu.transport.virtual import base as virtual

__all__ = ["GuardedAmqpMessage", "GuardedVirtualMessage", "strip_compression"]


def strip_compression(headers: Any) -> str | None:
    """Remove a ``compression`` header in place; return the refusal reason if present."""
    if isinstance(headers, dict) and "compression" in headers:
        headers.pop("compression", None)
        return "compression_refused"
    return None


class GuardedAmqpMessage(pyamqp.Message):
    """py-amqp message whose compressed bodies are refused, not inflated."""

    def __init__(self, msg: Any, channel: Any = None, **kwargs: Any) -> None:
        self.mqtasks_refused = strip_compression(msg.properties.get("application_headers"))
        super().__init__(msg, channel=channel, **kwargs)


class GuardedVirtualMessage(virtual.Message):
    """Virtual-transport (Redis, memory) message with the same guard."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        self.mqtasks_refused = strip_compression(payload.get("headers"))
        super().__init__(payload, channel=channel, **kwargs)
