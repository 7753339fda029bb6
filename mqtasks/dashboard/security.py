"""The dashboard's guards: HTTP basic auth, and the CSRF token every action form carries.

CSRF protection is a signed double submit: each browser gets a random token
signed with a key made when the dashboard starts, in a ``SameSite=Strict``
cookie; every action form repeats it in a hidden field. A POST is refused
(403) unless both are present, equal and carry a valid signature, and unless
its ``Origin`` (when the browser sends one) is the dashboard's own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "LOOPBACK_HOSTS",
    "AllowedHosts",
    "BasicAuth",
    "CsrfTokens",
    "parse_auth",
]

#: The cookie holding the browser's CSRF token.
CSRF_COOKIE = "mqtasks_csrf"
#: The form field every action repeats it in.
CSRF_FIELD = "csrf_token"


#: The names a dashboard bound to a loopback address answers to.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_auth(value: str) -> tuple[str, str]:
    """Split ``user:password`` (the password may hold colons).

    Raises:
        ValueError: No colon, or an empty user or password.
    """
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("expected user:password, both non-empty")
    return user, password


class BasicAuth:
    """ASGI middleware: every HTTP request needs these basic-auth credentials (401 otherwise)."""

    def __init__(self, app: ASGIApp, user: str, password: str) -> None:
        self.app = app
        self._user = user.encode()
        self._password = password.encode()

    def _allowed(self, header: str | None) -> bool:
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        # Both compared in constant time, whatever the first one gave.
        same_user = hmac.compare_digest(user, self._user)
        same_password = hmac.compare_digest(password, self._password)
        return bool(sep) and same_user and same_password

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(Headers(scope=scope).get("authorization")):
            response = PlainTextResponse(
                "Authentication required.",
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="mqtasks dashboard", charset="UTF-8"'},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class AllowedHosts:
    """ASGI middleware: answer only requests whose ``Host`` names one of ``hosts`` (400 otherwise).

    A dashboard on 127.0.0.1 would otherwise answer a page of another site
    whose name was made to resolve to 127.0.0.1 (DNS rebinding): to the
    browser that page is same-origin with the dashboard, token and all.
    """

    def __init__(self, app: ASGIApp, hosts: tuple[str, ...]) -> None:
        self.app = app
        self.hosts = frozenset(h.lower().strip("[]") for h in hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = urlsplit("//" + Headers(scope=scope).get("host", "")).hostname or ""
            if host.lower() not in self.hosts:
                response = PlainTextResponse("Unknown host.", status_code=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CsrfTokens:
    """Makes and checks the signed CSRF tokens of one dashboard (its key lives in memory)."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._key, nonce.encode(), hashlib.sha256).hexdigest()

    def new(self) -> str:
        """Return a fresh signed token."""
        nonce = secrets.token_urlsafe(24)
        return f"{nonce}.{self._sign(nonce)}"

    def valid(self, token: str | None) -> bool:
        """Whether ``token`` was made by :meth:`new` of this dashboard."""
        if not token or "." not in token:
            return False
        nonce, _, signature = token.partition(".")
        return hmac.compare_digest(signature, self._sign(nonce))

    def check(self, cookie: str | None, submitted: str | None) -> bool:
        """Whether a POST's form token matches its cookie and both are signed by us."""
        if not cookie or not submitted:
            return False
        return hmac.compare_digest(cookie, submitted) and self.valid(cookie)


def same_origin(headers: Headers) -> bool:
    """Whether the request's ``Origin`` (if any) names the host it was sent to."""
    origin = headers.get("origin")
    if origin is None:
        return True  # not every browser sends it on a same-origin POST; the token decides
    return urlsplit(origin).netloc == headers.get("host")


class CsrfCookie:
    """ASGI middleware: give each browser a token cookie, and the request its token.

    The token is put in ``scope["state"]["csrf_token"]`` for the templates.
    """

    def __init__(self, app: ASGIApp, tokens: CsrfTokens) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cookies = _cookies(Headers(scope=scope).get("cookie", ""))
        token = cookies.get(CSRF_COOKIE)
        fresh = not self.tokens.valid(token)
        if fresh:
            token = self.tokens.new()
        scope.setdefault("state", {})["csrf_token"] = token

        async def send_with_cookie(message: Message) -> None:
            if fresh and message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.append(
                    "set-cookie", f"{CSRF_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
                )
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out.setdefault(name, value)
    return out
