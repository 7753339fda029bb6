"""Broker URL helpers shared by every layer: masking passwords for logs, errors and headers."""

from __future__ import annotations

import re
import threading
from urllib.parse import unquote, urlsplit

from kombu.utils.url import maybe_sanitize_url

__all__ = ["MASK", "MIN_SECRET_LENGTH", "mask_url", "redact", "remember_secret"]

#: What a password is replaced by.
MASK = "**"
#: Shortest password :func:`redact` also masks where it appears outside a URL;
#: shorter ones (``guest``) would mask ordinary words.
MIN_SECRET_LENGTH = 6

# scheme://user:password@ ; the password runs to the last '@' before the host.
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@]*:)([^\s/]*)@")
_SINGLE_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s;]*")
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``**``, safe to log or print.

    Text that is not a single URL (a message quoting one) is passed through
    ``redact`` instead, so it keeps its words.
    """
    if _SINGLE_URL.fullmatch(url):
        url = maybe_sanitize_url(url, mask=MASK)
    return redact(url)


def remember_secret(url: str) -> None:
    """Have :func:`redact` also mask the password of ``url`` wherever it appears.

    Transports call this with their broker URL, so that the password is masked
    even in text that does not show it as part of a URL (an exception message
    that quotes it, a traceback line). A failover list (``first;second``) has
    each of its passwords remembered (and a password holding ``;`` whole).
    """
    for part in dict.fromkeys([url, *url.split(";")]):
        try:
            password = urlsplit(part).password if "://" in part else None
        except ValueError:
            password = None
        if not password:
            continue
        with _secrets_lock:
            for secret in {password, unquote(password)}:
                if len(secret) >= MIN_SECRET_LENGTH:
                    _secrets.add(secret)


def redact(text: str) -> str:
    """Return ``text`` with every URL password and every remembered password masked.

    Use it on any text that leaves the process and may quote a broker URL:
    exception messages, tracebacks, log fields, dead-letter headers.
    """
    if "@" in text:
        text = _USERINFO.sub(rf"\g<1>{MASK}@", text)
    if _secrets:
        with _secrets_lock:
            secrets = sorted(_secrets, key=len, reverse=True)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, MASK)
    return text
