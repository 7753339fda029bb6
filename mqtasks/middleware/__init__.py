"""Middleware: the hook interface and the default stack."""

from __future__ import annotations

from .base import Middleware

__all__ = ["DEFAULT_MIDDLEWARE", "Middleware"]

#: Middleware classes an App installs when none are given.
DEFAULT_MIDDLEWARE: tuple[type[Middleware], ...] = ()
