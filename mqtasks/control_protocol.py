"""The wire of heartbeats and remote control: names, queues, and checking what arrives.

Heartbeats, requests and replies all go through one topic exchange,
:data:`CONTROL_EXCHANGE`, with the transport's ``bind``/``emit`` (the primitives
broadcast tasks and events use), so every broker that routes events carries
them: RabbitMQ routes them itself, ``redis://`` and ``memory://`` with their
emulated exchanges. Routing keys start with the app's name, so apps sharing a
broker never see each other's workers:

- ``<app>.hb.<worker id>``: a worker's heartbeat (and its goodbye when it stops);
- ``<app>.ctl.all`` and ``<app>.ctl.id.<worker id>``: requests to every worker or one;
- ``<app>.reply.<reply id>``: the answers to one request, for the inspector that sent it.

Each of those queues belongs to one process (a worker, a monitor, an
inspector): non-durable, expiring once its owner is gone, with no dead-letter
queue of its own. Bodies are small JSON objects; :func:`decode` checks one
field by field and says why it refuses it, so that nothing a message says is
ever imported, called or unpickled.
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import structlog

from .exceptions import ConfigurationError
from .transport.delivery import Delivery
from .transport.envelope import Envelope
from .transport.queue import QueueSpec

if TYPE_CHECKING:
    from .app import App

__all__ = [
    "COMMANDS",
    "CONTROL_EXCHANGE",
    "HEARTBEAT_INTERVAL",
    "LOST_AFTER",
    "MAX_BODY",
    "MAX_STEP",
    "QUEUE_EXPIRES",
    "Heartbeat",
    "Rejected",
    "app_word",
    "decode",
    "encode",
    "heartbeat_of",
    "log_rejected",
    "new_id",
    "owned_queue",
    "require_control",
    "rss_bytes",
    "scope",
    "worker_id",
]

logger = structlog.get_logger("mqtasks.control")

#: Seconds between two heartbeats of a worker.
HEARTBEAT_INTERVAL = 2.0
#: Seconds without a heartbeat after which a worker is shown as lost (three missed).
LOST_AFTER = 3 * HEARTBEAT_INTERVAL
#: The topic exchange heartbeats, requests and replies go through.
CONTROL_EXCHANGE = "mqtasks.control"
#: Seconds a worker's, monitor's or inspector's queue outlives its owner.
QUEUE_EXPIRES = 30.0
#: The largest body accepted; a request or heartbeat is far smaller.
MAX_BODY = 64 * 1024
#: Where a control queue's dead letters would go: never declared, so none is kept.
_NO_DEAD_LETTERS = "mqtasks.control.dlq"

#: The commands a worker answers, and the kind of argument each takes (None: none).
COMMANDS: Mapping[str, type | None] = {
    "ping": None,
    "active": None,
    "stats": None,
    "registered": None,
    "shutdown": None,
    "pool-grow": int,
    "pool-shrink": int,
    "cancel-consumer": str,
    "add-consumer": str,
}

#: The fields of each kind of message; anything else is refused.
_FIELDS: Mapping[str, frozenset[str]] = {
    "request": frozenset(
        {"v", "kind", "app", "scope", "id", "command", "argument", "reply_to", "destination"}
    ),
    "reply": frozenset({"v", "kind", "app", "scope", "id", "worker_id", "answer", "error"}),
    "heartbeat": frozenset(
        {
            "v",
            "kind",
            "app",
            "scope",
            "worker_id",
            "host",
            "pid",
            "queues",
            "concurrency",
            "busy",
            "done",
            "failed",
            "rss",
            "version",
            "sent_at",
            "active",
        }
    ),
    "goodbye": frozenset({"v", "kind", "app", "scope", "worker_id"}),
}
_HEX = re.compile(r"[0-9a-f]{32}")
_WORD = re.compile(r"[^A-Za-z0-9_:-]")
#: A queue name a control command may name (no wildcards, spaces or control characters).
_QUEUE = re.compile(r"[A-Za-z0-9_.:@/-]{1,200}")
#: Most threads one pool-grow or pool-shrink may add or remove.
MAX_STEP = 1000


class Rejected(Exception):
    """A message refused, with the reason logged as ``control.rejected``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def log_rejected(rejected: Rejected, delivery: Delivery) -> None:
    """Log ``control.rejected`` with the reason: the message is ignored."""
    logger.warning(
        "control.rejected",
        reason=rejected.reason,
        detail=rejected.detail,
        message_id=delivery.message_id,
        queue=delivery.queue,
    )


@dataclass(frozen=True)
class Heartbeat:
    """What a worker says of itself every :data:`HEARTBEAT_INTERVAL` seconds.

    Attributes:
        worker_id: ``<host>:<pid>`` (a second worker in one process gets ``-<n>``).
        host: The host name.
        pid: The worker process's id.
        queues: The queues it consumes now.
        concurrency: Its threads.
        busy: Threads running a task now.
        done: Tasks that returned, since it started.
        failed: Tasks that raised (retries and time limits included), since it started.
        rss: Resident memory of its process, in bytes.
        version: The mqtasks version it runs.
        sent_at: When it was sent (epoch seconds, the worker's clock).
        active: The running tasks: ``{"id", "task", "started_at"}`` each.
    """

    worker_id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    busy: int
    done: int
    failed: int
    rss: int
    version: str
    sent_at: float
    active: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The heartbeat as a JSON-ready dict."""
        return asdict(self)


def require_control(app: App) -> None:
    """Refuse heartbeats and remote control on a broker that cannot route them.

    Raises:
        ConfigurationError: The transport lacks ``exchanges`` or ``expiring_queues``
            (``redis+kombu://``).
    """
    transport = app.transport
    caps = transport.capabilities
    if not (caps.exchanges and caps.expiring_queues):
        raise ConfigurationError(
            f"{transport.schemes[0]}:// cannot carry heartbeats or remote control: they need "
            "an exchange that copies a message into each worker's queue and queues the "
            "broker drops once their owner is gone. Use amqp://, redis:// or memory://."
        )


def app_word(app: App) -> str:
    """The first word of the app's routing keys: its name, with only ``[A-Za-z0-9_:-]``."""
    return _WORD.sub("_", app.name) or "_"


def scope(app: App) -> str:
    """The broker namespace the app lives in: its vhost (or Redis database) and key prefix.

    Sent in every message and compared by the receiver: a message from another
    namespace (relayed, replayed or forged) is refused.
    """
    url = app.settings.broker_url
    parts = urlsplit(url) if "://" in url else None
    path = unquote(parts.path[1:]) if parts is not None and parts.path else ""
    prefix = getattr(app.transport, "key_prefix", "")
    return f"{path or '/'}|{prefix}"


def worker_id(sequence: int = 0) -> str:
    """``<host>:<pid>`` of this process, ``-<n>`` added for its ``n``-th extra worker."""
    host = _WORD.sub("_", socket.gethostname()) or "host"
    return f"{host}:{os.getpid()}" + (f"-{sequence}" if sequence else "")


def owned_queue(name: str) -> QueueSpec:
    """The spec of a queue one process owns: non-durable, expiring, no dead-letter queue."""
    return QueueSpec(
        name,
        queue_type="classic",
        durable=False,
        expires=QUEUE_EXPIRES,
        dead_letter_queue=_NO_DEAD_LETTERS,
    )


def new_id() -> str:
    """A fresh request or reply id (32 hex digits)."""
    return uuid.uuid4().hex


def encode(app: App, kind: str, **fields: Any) -> Envelope:
    """The envelope of a ``kind`` message of ``app`` with ``fields``."""
    body = {"v": 1, "kind": kind, "app": app.name, "scope": scope(app), **fields}
    data = json.dumps(body, separators=(",", ":"), default=str).encode()
    return Envelope(data, message_id=new_id(), headers={"mqtasks-control": kind})


def decode(app: App, body: bytes, kinds: frozenset[str]) -> dict[str, Any]:
    """Check a received body; return it as a dict.

    Args:
        app: The receiver's app: the message must be of this app and its namespace.
        body: The body as received.
        kinds: The kinds the receiver takes.

    Raises:
        Rejected: With the reason: ``oversized``, ``not_json``, ``not_an_object``,
            ``bad_version``, ``unexpected_kind``, ``unexpected_field``, ``wrong_app``,
            ``wrong_scope``, ``unknown_command``, ``bad_argument``, ``bad_field``.
    """
    if len(body) > MAX_BODY:
        raise Rejected("oversized", f"{len(body)} bytes, at most {MAX_BODY}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Rejected("not_json", str(exc)[:200]) from None
    if not isinstance(data, dict):
        raise Rejected("not_an_object", type(data).__name__)
    if data.get("v") != 1:
        raise Rejected("bad_version", repr(data.get("v"))[:40])
    kind = data.get("kind")
    if kind not in kinds or not isinstance(kind, str):
        raise Rejected("unexpected_kind", repr(kind)[:40])
    extra = sorted(str(k)[:40] for k in set(data) - _FIELDS[kind])
    if extra:
        raise Rejected("unexpected_field", ", ".join(extra[:5]))
    if data.get("app") != app.name:
        raise Rejected("wrong_app", repr(data.get("app"))[:80])
    if data.get("scope") != scope(app):
        raise Rejected("wrong_scope", repr(data.get("scope"))[:80])
    if kind == "request":
        _check_request(data)
    elif kind == "heartbeat":
        _check_heartbeat(data)
    else:
        _need(data, "worker_id", str)
    return data


def _need(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise Rejected("bad_field", f"{name}={repr(value)[:40]}")
    return value


def _check_request(data: Mapping[str, Any]) -> None:
    command = data.get("command")
    if not isinstance(command, str) or command not in COMMANDS:
        raise Rejected("unknown_command", repr(command)[:60])
    argument, wanted = data.get("argument"), COMMANDS[command]
    if wanted is None and argument is not None:
        raise Rejected("bad_argument", f"{command} takes no argument")
    if wanted is int and not (
        isinstance(argument, int) and not isinstance(argument, bool) and 1 <= argument <= MAX_STEP
    ):
        raise Rejected("bad_argument", f"{command} takes a number of threads, 1 to {MAX_STEP}")
    if wanted is str and not (isinstance(argument, str) and _QUEUE.fullmatch(argument)):
        raise Rejected("bad_argument", f"{command} takes a queue name")
    for name in ("id", "reply_to"):
        if not _HEX.fullmatch(str(_need(data, name, str))):
            raise Rejected("bad_field", f"{name} is not 32 hex digits")
    destination = data.get("destination")
    if destination is not None and not isinstance(destination, str):
        raise Rejected("bad_field", "destination")


def _check_heartbeat(data: Mapping[str, Any]) -> None:
    for name in ("worker_id", "host", "version"):
        _need(data, name, str)
    for name in ("pid", "concurrency", "busy", "done", "failed", "rss"):
        _need(data, name, int)
    _need(data, "sent_at", (int, float))
    queues, active = _need(data, "queues", list), _need(data, "active", list)
    if not all(isinstance(q, str) for q in queues) or not all(isinstance(a, dict) for a in active):
        raise Rejected("bad_field", "queues or active")


def heartbeat_of(data: Mapping[str, Any]) -> Heartbeat:
    """The :class:`Heartbeat` of a decoded heartbeat message."""
    return Heartbeat(
        worker_id=data["worker_id"],
        host=data["host"],
        pid=data["pid"],
        queues=list(data["queues"]),
        concurrency=data["concurrency"],
        busy=data["busy"],
        done=data["done"],
        failed=data["failed"],
        rss=data["rss"],
        version=data["version"],
        sent_at=float(data["sent_at"]),
        active=[dict(a) for a in data["active"]],
    )


def rss_bytes() -> int:
    """This process's resident memory in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return 0
