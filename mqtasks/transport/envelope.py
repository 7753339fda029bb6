"""What a transport publishes: an opaque body with its id, headers and content type.

Kept apart from the transport interface so that the message layer can build
envelopes without importing any broker client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["Envelope"]


@dataclass(frozen=True)
class Envelope:
    """What a transport publishes: an opaque body plus metadata."""

    body: bytes
    message_id: str
    headers: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    priority: int | None = None
