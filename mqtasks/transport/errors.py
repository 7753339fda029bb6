"""One translation of broker client errors into mqtasks' :class:`~mqtasks.exceptions.TransportError` tree.

Every transport call that can raise a kombu, py-amqp or redis-py error runs
inside :func:`translate_errors`, so callers above the transport layer only ever
catch :mod:`mqtasks.exceptions`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .._url import mask_url, redact
from ..exceptions import ConnectionFailed, QueueNotFound, TransportError
from .tls import tls_failure

__all__ = ["caused_by", "is_not_found", "translate_errors"]

#: How deep a cause chain is followed when looking for a particular error.
_CHAIN_DEPTH = 10


@contextlib.contextmanager
def translate_errors(url: str, what: str, *, queue: str | None = None) -> Iterator[None]:
    """Turn kombu, py-amqp and redis errors into :class:`~mqtasks.exceptions.TransportError` subclasses.

    Args:
        url: The broker URL (masked in every message).
        what: What was being done, for the message (``"declare queues"``).
        queue: The queue the call concerns: a broker's "not found" (AMQP 404)
            then becomes :class:`~mqtasks.exceptions.QueueNotFound` naming it.
    """
    try:
        yield
    except TransportError as exc:
        if queue is not None and not isinstance(exc, QueueNotFound) and is_not_found(exc):
            raise QueueNotFound(f"Queue {queue!r} does not exist.") from exc
        raise
    except (ConnectionError, OSError, TimeoutError) as exc:
        raise ConnectionFailed(_unreachable(url, what, exc)) from exc
    except Exception as exc:
        if queue is not None and is_not_found(exc):
            raise QueueNotFound(f"Queue {queue!r} does not exist.") from exc
        if isinstance(exc, _connection_errors()):
            raise ConnectionFailed(_unreachable(url, what, exc)) from exc
        if isinstance(exc, _channel_errors()):
            raise TransportError(
                redact(
                    f"{what}: the broker at {mask_url(url)} refused ({type(exc).__name__}: {exc})"
                )
            ) from exc
        raise


def is_not_found(exc: BaseException | None) -> bool:
    """Whether ``exc`` or its cause chain is a broker's "no such queue" (AMQP 404)."""
    seen = 0
    while exc is not None and seen < _CHAIN_DEPTH:
        if getattr(exc, "code", None) == 404:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def caused_by(exc: BaseException | None, name: str) -> bool:
    """Whether ``exc`` or an exception in its cause chain has class name ``name``."""
    seen = 0
    while exc is not None and seen < _CHAIN_DEPTH:
        if type(exc).__name__ == name:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _unreachable(url: str, what: str, exc: BaseException) -> str:
    """The message of a failed connection: the TLS refusal if that is what it was."""
    refused = tls_failure(exc)
    if refused is not None:
        return redact(
            f"{what}: the TLS certificate of the broker at {mask_url(url)} was refused "
            f"({refused}). Trust the CA that signed it with TLSOptions(ca_file=...) "
            "(MQTASKS_TLS_CA_FILE) and connect by a host name the certificate lists."
        )
    return redact(
        f"{what}: cannot reach the broker at {mask_url(url)} ({type(exc).__name__}: {exc})"
    )


def _connection_errors() -> tuple[type[BaseException], ...]:
    # Imported when an error is being translated, not at import time: the
    # transport package loads no broker client until a transport is built.
    import amqp.exceptions
    import redis.exceptions
    from kombu.exceptions import OperationalError

    return (
        OperationalError,
        amqp.exceptions.ConnectionError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
    )


def _channel_errors() -> tuple[type[BaseException], ...]:
    import amqp.exceptions
    import redis.exceptions
    from kombu.exceptions import KombuError

    return (amqp.exceptions.AMQPError, redis.exceptions.RedisError, KombuError)
