"""Broker URL helpers shared by every layer: masking passwords for logs, errors and headers."""

from __future__ import annotations

import re
import threading
from urllib.parse import parse_qsl, quote, unquote, urlparse, urlsplit

__all__ = ["MASK", "MIN_SECRET_LENGTH", "mask_url", "redact", "remember_secret"]

#: What a password is replaced by.
MASK = "**"
#: Shortest password :func:`redact` also masks where it appears outside a URL;
#: shorter ones (``guest``) would mask ordinary words.
MIN_SECRET_LENGTH = 6

# scheme://user:password@ ; the password runs to the last '@' before the host.
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@]*:)([^\s/]*)@")
_SINGLE_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s;]*")
# ?sentinel_password=... , &password=... : a password given as a query parameter.
_QUERY_PASSWORD = re.compile(r"([?&][A-Za-z0-9_.\-]*password=)([^&#\s]*)", re.IGNORECASE)
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``**``, safe to log or print.

    Text that is not a single URL (a message quoting one) is passed through
    ``redact`` instead, so it keeps its words.
    """
    if _SINGLE_URL.fullmatch(url):
        try:
            url = _rebuild_masked(url)
        except ValueError:  # a port that is not a number: the password is still masked below
            pass
    return redact(url)


def _rebuild_masked(url: str) -> str:
    """Return ``url`` rebuilt from its parts with the password replaced by :data:`MASK`.

    The URL is shown as kombu's ``sanitize_url`` shows it, and this is that
    function's logic written out here rather than imported: importing
    ``kombu.utils.url`` imports kombu (and through it ``importlib.metadata``,
    billiard and multiprocessing) into every process that imports mqtasks,
    one that never uses a transport included, only to print a URL.
    The query string is left out on purpose: it may carry a password too
    (``redis://host/0?password=...``, ``postgresql://...?password=...``).

    Raises:
        ValueError: The port is not a number from 0 to 65535.
    """
    scheme = urlparse(url).scheme
    # Parsed with HTTP semantics, so that any scheme has a host and a port.
    parts = urlparse("http://" + url[len(scheme) + 3 :])
    if "," in parts.netloc.rpartition("@")[2]:
        return _rebuild_host_list(scheme, parts.netloc, parts.path)
    user = unquote(parts.username or "")
    password = unquote(parts.password or "")
    host = unquote(parts.hostname or "")
    port = parts.port
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    shown = [f"{scheme}://"]
    if user or password:
        if user:
            shown.append(quote(user, safe=""))
        if password:
            shown.append(":" + MASK)
        shown.append("@")
    if host:
        shown.append(quote(host, safe=""))
    if port:
        shown.append(f":{port}")
    shown.append("/" + unquote(path))
    return "".join(shown)


def _rebuild_host_list(scheme: str, netloc: str, path: str) -> str:
    """:func:`_rebuild_masked` for a URL naming several hosts
    (``redis+sentinel://:pw@s1:26379,s2:26379/mymaster/0``): the hosts as given.

    Raises:
        ValueError: A host's port is not a number from 0 to 65535.
    """
    userinfo, at, hosts = netloc.rpartition("@")
    for host in hosts.split(","):
        _ = urlsplit("//" + host).port  # raises ValueError for a bad port
    user, _, password = userinfo.partition(":")
    shown = f"{scheme}://"
    if at and (user or password):
        shown += quote(unquote(user), safe="") + (":" + MASK if password else "") + "@"
    return shown + hosts + (path or "/")


def remember_secret(url: str) -> None:
    """Have :func:`redact` also mask the password of ``url`` wherever it appears.

    Transports call this with their broker URL, so that the password is masked
    even in text that does not show it as part of a URL (an exception message
    that quotes it, a traceback line). A failover list (``first;second``) has
    each of its passwords remembered (and a password holding ``;`` whole).
    """
    for part in dict.fromkeys([url, *url.split(";")]):
        try:
            parts = urlsplit(part) if "://" in part else None
            passwords = [parts.password or ""] if parts is not None else []
            if parts is not None:
                passwords += [v for k, v in parse_qsl(parts.query) if "password" in k.lower()]
        except ValueError:
            passwords = []
        with _secrets_lock:
            for secret in {p for password in passwords for p in (password, unquote(password))}:
                if len(secret) >= MIN_SECRET_LENGTH:
                    _secrets.add(secret)


def redact(text: str) -> str:
    """Return ``text`` with every URL password and every remembered password masked.

    Use it on any text that leaves the process and may quote a broker URL:
    exception messages, tracebacks, log fields, dead-letter headers.
    """
    if "@" in text:
        text = _USERINFO.sub(rf"\g<1>{MASK}@", text)
    if "password=" in text.lower():
        text = _QUERY_PASSWORD.sub(rf"\g<1>{MASK}", text)
    if _secrets:
        with _secrets_lock:
            secrets = sorted(_secrets, key=len, reverse=True)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, MASK)
    return text
