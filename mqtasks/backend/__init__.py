"""Backend URL scheme -> backend class; :func:`resolve` builds one from a URL.

As in :mod:`mqtasks.transport`, the table names each class by its import path:
importing :mod:`mqtasks.backend` loads no database client, and a backend's
module (redis-py, psycopg) is imported only when a URL asks for it. Layers
above name only this package and :mod:`mqtasks.backend.base`, never a concrete
backend module.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..exceptions import ConfigurationError
from .base import Backend

if TYPE_CHECKING:
    from ..transport.tls import TLSOptions

__all__ = ["BACKENDS", "SCHEMES", "Backend", "backend_class", "resolve"]

#: URL scheme -> ``module:Class`` of its backend.
BACKENDS: dict[str, str] = {
    "memory": "mqtasks.backend.memory:MemoryBackend",
    "redis": "mqtasks.backend.redis:RedisBackend",
    "rediss": "mqtasks.backend.redis:RedisBackend",
    "redis+sentinel": "mqtasks.backend.redis:RedisBackend",
    "rediss+sentinel": "mqtasks.backend.redis:RedisBackend",
    "postgresql": "mqtasks.backend.postgres:PostgresBackend",
    "postgres": "mqtasks.backend.postgres:PostgresBackend",
}

#: The URL schemes :func:`resolve` accepts, sorted.
SCHEMES: tuple[str, ...] = tuple(sorted(BACKENDS))


def backend_class(scheme: str) -> type[Backend]:
    """Return the backend class that serves URL scheme ``scheme``.

    Raises:
        ConfigurationError: No backend serves it; the error names the supported
            schemes and the closest match.
    """
    try:
        path = BACKENDS[scheme]
    except KeyError:
        close = difflib.get_close_matches(scheme, SCHEMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigurationError(
            f"Unknown result backend {scheme!r}.{hint} Supported URL schemes: {', '.join(SCHEMES)}."
        ) from None
    module, _, name = path.partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module), name)
    return cls


def resolve(url: str, *, key_prefix: str = "mqtasks:", tls: TLSOptions | None = None) -> Backend:
    """Build the backend that serves ``url``; it connects on first use, not here.

    Args:
        url: A backend URL: ``memory://``, ``redis://host:6379/0``,
            ``rediss://...``, ``postgresql://user@host/db`` (``postgres://``
            too; ``?table_prefix=`` names its tables).
        key_prefix: Put in front of every key, so that apps can share one store.
        tls: TLS settings for ``rediss://`` (the certificate and host name are
            verified unless ``verify=False``) and ``postgresql://`` (then
            ``sslmode=verify-full``); None: the defaults.

    Raises:
        ConfigurationError: No backend serves the URL's scheme (the error names
            the supported ones), or the URL or options cannot work.
    """
    if "://" not in url:
        # Not quoted: without a scheme it is no URL that mask_url can find a password in.
        raise ConfigurationError(
            "The result backend URL has no scheme; "
            f"use one of {', '.join(s + '://' for s in SCHEMES)}."
        )
    scheme = urlsplit(url).scheme.lower()
    cls = backend_class(scheme)
    return cls(url, key_prefix=key_prefix, tls=tls)
