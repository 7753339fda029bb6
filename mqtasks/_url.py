"""Broker URL helpers shared by every layer: masking passwords for logs and errors."""

from __future__ import annotations

from kombu.utils.url import maybe_sanitize_url

__all__ = ["mask_url"]


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``**``, safe to log or print."""
    masked: str = maybe_sanitize_url(url, mask="**")
    return masked
