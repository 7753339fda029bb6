"""Topic exchanges on ``redis://`` (events): bindings stored in Redis, fan-out in one script.

An exchange is the hash ``{p}:x:<exchange>``: one field ``"<queue> <pattern>"``
per binding (queue names have no spaces), its value the queue's
``max_priority`` or empty, followed by ``;live`` for a queue declared with
``expires`` (a worker's broadcast queue): such a binding is live while the
key ``{p}:qlive:<queue>`` exists, which each :func:`bind` sets again for
``expires`` seconds; an emit skips a binding no longer live and removes it,
with the queue's lists and delayed set. Emitting is one ``EVALSHA`` of
``EMIT`` (:mod:`~mqtasks.transport.redis.scripts`): Redis reads the hash, matches the
routing key against each pattern (the Lua twin of
:func:`~mqtasks.transport.topic.topic_matches`), and LPUSHes the element into
each matching queue once, at the priority level a publish would use, all in one
atomic step: every matching queue gets the event, or (the call fails) none.
The element is the one :meth:`~mqtasks.transport.redis.RedisTransport.publish`
writes, so consumers, dead letters and queue statistics see no difference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...exceptions import PublishError
from ..base import QueueSpec
from ..envelope import Envelope
from ..errors import translate_errors
from ..topic import check_exchange, check_key, check_pattern
from .element import encode_element, priority_level
from .scripts import EMIT

if TYPE_CHECKING:
    from . import RedisTransport

__all__ = ["bind", "bindings", "emit", "exchange_key", "live_key", "unbind"]


def exchange_key(transport: RedisTransport, exchange: str) -> str:
    """The hash of ``exchange``'s bindings."""
    return f"{transport.key_prefix}:x:{exchange}"


def live_key(transport: RedisTransport, queue: str) -> str:
    """The key whose presence keeps the bindings of ``queue`` (declared with ``expires``) live."""
    return f"{transport.key_prefix}:qlive:{queue}"


def bind(transport: RedisTransport, exchange: str, pattern: str, spec: QueueSpec) -> None:
    """Check ``spec`` (as ``declare`` does) and store the binding with its ``max_priority``.

    The queue's other bindings on ``exchange`` take the same ``max_priority``,
    so that an emit caps its priority alike whichever pattern matched.
    """
    check_exchange(exchange)
    check_pattern(pattern)
    transport.declare([spec])
    key = exchange_key(transport, exchange)
    value = "" if spec.max_priority is None else str(spec.max_priority)
    if spec.expires is not None:
        value += ";live"
    mine = f"{spec.name} ".encode()
    with translate_errors(transport.url, f"bind {spec.name!r} to {exchange!r}"):
        client = transport.publisher()
        fields: dict[str | bytes, str] = {f: value for f in client.hkeys(key) if f.startswith(mine)}
        fields[f"{spec.name} {pattern}"] = value
        if spec.expires is not None:  # live first: an emit never sees it bound and stale
            client.set(live_key(transport, spec.name), b"1", px=max(1, int(spec.expires * 1000)))
        client.hset(key, mapping=fields)


def unbind(transport: RedisTransport, exchange: str, pattern: str, queue: str) -> None:
    """Remove one binding (an absent one: nothing)."""
    check_exchange(exchange)
    with translate_errors(transport.url, f"unbind {queue!r} from {exchange!r}"):
        transport.publisher().hdel(exchange_key(transport, exchange), f"{queue} {pattern}")


def bindings(transport: RedisTransport, exchange: str) -> list[tuple[str, str]]:
    """Return the ``(pattern, queue)`` bindings stored for ``exchange``, sorted."""
    check_exchange(exchange)
    with translate_errors(transport.url, f"read the bindings of {exchange!r}"):
        fields = transport.publisher().hkeys(exchange_key(transport, exchange))
    found = []
    for field in fields:
        queue, _, pattern = field.decode(errors="replace").partition(" ")
        found.append((pattern, queue))
    return sorted(found)


def emit(
    transport: RedisTransport,
    exchange: str,
    routing_key: str,
    envelope: Envelope,
    mandatory: bool,
) -> int:
    """Push ``envelope`` into every queue bound with a matching pattern, atomically.

    One command from the client (``EVALSHA``; the first call of a process also
    loads the script). Server-side the script runs ``HGETALL`` of the bindings,
    one ``LPUSH`` per matching queue and, for a priority above 0, the wake-up of
    that queue's list (see the scripts module).

    Raises:
        Unroutable: ``mandatory`` and no binding matches.
        PublishError: Redis refused (nothing was pushed) or did not answer in time.
    """
    check_exchange(exchange)
    check_key(routing_key)
    where = f"exchange {exchange!r} (routing key {routing_key!r})"
    try:
        element = encode_element(envelope)
    except (TypeError, ValueError) as exc:
        raise PublishError(
            f"Task {envelope.message_id} was NOT enqueued on {where}: headers must be "
            f"JSON values on this transport ({exc}).",
            task_id=envelope.message_id,
        ) from exc
    script = transport._script(EMIT)
    keys = [exchange_key(transport, exchange)]
    args = [
        routing_key,
        priority_level(envelope.priority),
        element,
        transport.queue_key(""),
        live_key(transport, ""),
        transport.delayed_key(""),
    ]
    count = int(
        transport.run_publish(
            lambda client: script(keys=keys, args=args, client=client), envelope, where
        )
    )
    if count == 0 and mandatory:
        raise transport.unroutable_event(exchange, routing_key, envelope)
    return count
