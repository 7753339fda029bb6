"""Redis connection pools for ``redis://`` URLs and for Redis behind Sentinel
(``redis+sentinel://``), shared by the Redis transport and the Redis backend.

A Sentinel URL names the Sentinels, the monitored service and the database::

    redis+sentinel://[[user]:password@]s1:26379,s2:26379,s3:26379/mymaster/0
        [?sentinel_password=...&sentinel_username=...]

The user and password in front are the data nodes' (primary and replicas); the
Sentinels' own, when they ask for one, go in the query. ``rediss+sentinel://``
connects to the Sentinels and to the data nodes with TLS.

Discovery is redis-py's (:class:`redis.sentinel.SentinelConnectionPool`): each
new connection asks the Sentinels for the current primary, and a connection
to a server that was demoted to a replica raises a connection error at its
next command, so the callers' reconnect paths follow a failover without a
restart. Nothing here writes discovery by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

from ._url import mask_url
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .transport.tls import TLSOptions

__all__ = [
    "DEFAULT_SENTINEL_PORT",
    "SENTINEL_SCHEMES",
    "SentinelURL",
    "connection_pool",
    "database",
    "is_sentinel_url",
    "parse_sentinel_url",
]

#: URL schemes of Redis behind Sentinel (``rediss+sentinel`` with TLS).
SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})
#: The port of a Sentinel named without one.
DEFAULT_SENTINEL_PORT = 26379
_QUERY = ("sentinel_password", "sentinel_username")


@dataclass(frozen=True)
class SentinelURL:
    """The parts of a ``redis+sentinel://`` URL."""

    #: ``(host, port)`` of each Sentinel, in the URL's order.
    sentinels: tuple[tuple[str, int], ...]
    #: The name the Sentinels monitor the primary under (``mymaster``).
    service: str
    #: The database number on the data nodes.
    db: int
    #: Whether every connection (Sentinels and data nodes) uses TLS.
    tls: bool
    #: The data nodes' ACL user, if any.
    username: str | None = None
    #: The data nodes' password, if any.
    password: str | None = None
    #: The Sentinels' ACL user, if any.
    sentinel_username: str | None = None
    #: The Sentinels' password, if any.
    sentinel_password: str | None = None

    def __repr__(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"SentinelURL({hosts}/{self.service}/{self.db}, tls={self.tls})"


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` names Redis behind Sentinel."""
    return "://" in url and url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelURL:
    """Split a ``redis+sentinel://`` URL into its parts.

    Raises:
        ConfigurationError: It is not one, or it names no Sentinel or no service,
            has a bad port or database, or a query parameter other than
            ``sentinel_password`` and ``sentinel_username``.
    """

    def bad(why: str) -> ConfigurationError:
        return ConfigurationError(
            f"Bad Redis Sentinel URL {mask_url(url)}: {why}. Expected "
            "redis+sentinel://[:password@]host:26379,host2:26379/<service name>/<db>."
        )

    if not is_sentinel_url(url):
        raise bad("the scheme must be redis+sentinel or rediss+sentinel")
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    sentinels: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        if not item.strip():
            continue
        try:
            node = urlsplit("//" + item.strip())
            port = node.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise bad(f"{item.strip()!r} is not host:port") from None
        if not node.hostname:
            raise bad(f"{item.strip()!r} names no host")
        sentinels.append((node.hostname, port))
    if not sentinels:
        raise bad("it names no Sentinel")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise bad("the path must be /<service name> or /<service name>/<db>")
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise bad(f"the database {path[1]!r} is not a number") from None
    if db < 0:
        raise bad("the database cannot be negative")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - set(_QUERY))
    if unknown:
        raise bad(f"unknown query parameter(s) {unknown}; known: {list(_QUERY)}")
    return SentinelURL(
        sentinels=tuple(sentinels),
        service=path[0],
        db=db,
        tls=parts.scheme.lower() == "rediss+sentinel",
        username=unquote(user) or None,
        password=unquote(password) or None,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None,
    )


def database(url: str) -> int:
    """The database number ``url`` selects (``redis://``, ``rediss://`` or Sentinel).

    Raises:
        ConfigurationError: The URL cannot be read.
    """
    if is_sentinel_url(url):
        return parse_sentinel_url(url).db
    try:
        return int(redis.connection.parse_url(url).get("db") or 0)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"Bad Redis URL {mask_url(url)}: {exc}") from None


def connection_pool(url: str, *, tls: TLSOptions, **kwargs: Any) -> redis.ConnectionPool:
    """Return a redis-py connection pool for ``url``; it connects on first use.

    Args:
        url: ``redis://``, ``rediss://``, ``redis+sentinel://`` or ``rediss+sentinel://``.
        tls: Certificate options of a TLS URL (applied to the Sentinels too).
        kwargs: Connection pool arguments (``socket_timeout``, ``retry``,
            ``max_connections``...). The Sentinels are asked with the same
            socket options, the connect timeout as their command timeout.

    Raises:
        ConfigurationError: A Sentinel URL cannot be read, or ``connection_class``
            is given with one (the Sentinel pool needs its own).
    """
    if not is_sentinel_url(url):
        if url.lower().startswith("rediss://"):
            kwargs = {**tls.redis_kwargs(), **kwargs}
        return redis.ConnectionPool.from_url(url, **kwargs)
    parsed = parse_sentinel_url(url)
    if "connection_class" in kwargs:
        raise ConfigurationError(
            f"{mask_url(url)}: a connection_class cannot be used with Redis Sentinel; "
            "give a redis:// URL for a test double."
        )
    ssl: dict[str, Any] = {}
    if parsed.tls:
        ssl = {"ssl": True, **tls.redis_kwargs()}
    ask_timeout = kwargs.get("socket_connect_timeout") or kwargs.get("socket_timeout") or 5.0
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": ask_timeout,
        "socket_connect_timeout": ask_timeout,
        "socket_keepalive": kwargs.get("socket_keepalive", True),
        "username": parsed.sentinel_username,
        "password": parsed.sentinel_password,
        **ssl,
    }
    if "retry" in kwargs:
        sentinel_kwargs["retry"] = kwargs["retry"]
    manager = Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs)
    return SentinelConnectionPool(
        parsed.service,
        manager,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        **ssl,
        **kwargs,
    )
