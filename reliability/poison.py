"""S7: poison messages, injected past mqtasks' producer, and the tools S15 reuses.

Poison is published the way a hostile or buggy producer would: raw kombu on
RabbitMQ and ``memory://`` (the body and properties exactly as given, confirmed
by the broker), and on mqtasks' own Redis transport an ``LPUSH`` of the list
element format (flag, JSON metadata, newline, body). :data:`POISON_KINDS` lists
the kinds a to i of the protocol with their sub-variants and the dead-letter
reason each must end with; :func:`build_poison` makes one message and
:class:`PoisonInjector` (or :func:`inject_poison` for a single one) publishes it.

Every poison body that can carry text carries ``"<id>:<marker>"``: the id maps
a dead-letter entry back to its poison when the entry lost its id (a message
without one, or on Redis metadata too large to read), and the marker, found in
no other message, shows whether a worker wrote a body to its log.

:func:`s7` runs the scenario on the harness's brokers with the real worker
processes; :func:`memory_poison_part` runs the same workload and criteria in
process on ``memory://`` for S15.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import re
import secrets
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import kombu

from mqtasks import App, EncodeError
from mqtasks.deadletter import HEADER_DEATH_DROPPED_HEADERS
from mqtasks.dlq import list_dead_letters
from mqtasks.exceptions import MQTasksError
from mqtasks.message import HEADER_ATTEMPT, HEADER_EXPIRES, HEADER_TASK
from mqtasks.transport import QueueSpec, ReliableRedisTransport
from mqtasks.transport.amqp import AmqpTransport
from mqtasks.transport.base import dead_letter_spec
from mqtasks.transport.memory import MemoryTransport

from .harness import BrokerProfile, Harness, Job, Publisher, Run
from .ledger import Classification, Event, LedgerWriter, classify

__all__ = [
    "CLASS_MODULES",
    "KIND_REASONS",
    "POISON_KINDS",
    "Poison",
    "PoisonInjector",
    "PoisonKind",
    "PoisonWorkload",
    "build_poison",
    "inject_poison",
    "memory_poison_part",
    "s7",
    "variant_counts",
]

MiB = 1024 * 1024
#: Body of the large raw case of kind d.
BIG_BODY = 20 * MiB
#: What the compressed body of kind g inflates to.
BOMB_INFLATED = 300 * MiB
#: Length of the long header value of kind h (RabbitMQ: as long as one frame takes).
LONG_HEADER = 1 * MiB
#: Nesting of the deep JSON bomb of kind i.
DEEP_NESTING = 100_000
#: Digits of the huge integer of kind i.
HUGE_INT_DIGITS = 1_000_000
#: 9999-12-31T23:59:59Z, seconds since the epoch.
YEAR_9999 = 253402300799.0
#: C extension modules that poison names (as a task, as a header) and no worker
#: loads: if one shows up in a worker's memory map, something imported it.
CLASS_MODULES = ("_sqlite3", "_curses")
#: Good tasks between two 20 MiB bodies: a prefetch window (4) taken from a
#: backlog then holds one of them at most (a worker waiting on an empty queue may
#: still take the next one while its task thread dead-letters the last).
BIG_BODY_GAP = 10


@dataclass(frozen=True)
class PoisonKind:
    """One kind of poison: its protocol letter, what it is, the reason it must
    be dead-lettered with, and its sub-variants (the kind's count is spread over them)."""

    letter: str
    title: str
    reason: str
    variants: tuple[str, ...]


#: The kinds a to i of the protocol (j, a publish nobody can route, is not
#: injected: ``delay()`` itself must raise).
POISON_KINDS: dict[str, PoisonKind] = {
    k.letter: k
    for k in (
        PoisonKind(
            "a",
            "malformed JSON with application/json",
            "decode_error",
            ("truncated", "trailing-data", "invalid-utf8", "nan"),
        ),
        PoisonKind(
            "b",
            "unknown task name (never imported)",
            "unknown_task",
            ("unregistered", "os.system", "subprocess.Popen", "_sqlite3.connect"),
        ),
        PoisonKind(
            "c",
            "arguments that do not fit the task",
            "invalid_arguments",
            ("missing-arg", "extra-arg", "unknown-kwarg", "duplicate-arg"),
        ),
        PoisonKind("d", "body over max_message_size", "too_large", ("limit+1", "20MiB")),
        PoisonKind(
            "e",
            "not JSON",
            "content_type",
            ("text/plain", "application/x-yaml", "application/x-msgpack", "missing"),
        ),
        PoisonKind("f", "pickle that would create a file", "content_type", ("pickle",)),
        PoisonKind("g", "zlib bomb (compression header)", "compression_refused", ("zlib-300MiB",)),
        PoisonKind(
            "h",
            "bad mqtasks headers",
            "invalid_headers",
            (
                "missing-id",
                "attempt=-1",
                "attempt=abc",
                "attempt=10**9",
                "expires-9999",
                "1MiB-value",
                "forged-x-death",
                "class-header",
            ),
        ),
        PoisonKind(
            "i",
            "JSON bombs",
            "decode_error",
            (f"deep-{DEEP_NESTING}", f"int-{HUGE_INT_DIGITS}-digits"),
        ),
    )
}

#: Kind letter -> the dead-letter reason it must end with.
KIND_REASONS: dict[str, str] = {k: kind.reason for k, kind in POISON_KINDS.items()}


def variant_counts(kind: str, n: int) -> list[tuple[str, int]]:
    """Spread ``n`` messages of ``kind`` over its variants, the first ones getting the rest."""
    variants = POISON_KINDS[kind].variants
    per, extra = divmod(n, len(variants))
    return [(v, per + (1 if i < extra else 0)) for i, v in enumerate(variants)]


@dataclass(frozen=True)
class Poison:
    """One poison message, as it goes on the wire.

    Attributes:
        kind: Its kind letter.
        variant: Its sub-variant.
        id: The id the ledger knows it by (sent as the message id unless ``send_id`` is off).
        body: The raw body.
        headers: The raw headers.
        content_type: The content type property (None: none; kombu sends ``application/data``).
        content_encoding: The content encoding property.
        send_id: Whether the message carries ``id`` as its message id.
    """

    kind: str
    variant: str
    id: str
    body: bytes = field(repr=False)
    headers: Mapping[str, Any] = field(repr=False)
    content_type: str | None
    content_encoding: str | None
    send_id: bool = True

    @property
    def reason(self) -> str:
        """The dead-letter reason it must end with."""
        return KIND_REASONS[self.kind]


class Pwn:
    """A pickle that would create a file if anyone unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@functools.lru_cache(maxsize=1)
def zlib_bomb(inflated: int = BOMB_INFLATED) -> bytes:
    """About 300 KiB of zlib data that inflates to ``inflated`` bytes of zeros (as in C5)."""
    packer = zlib.compressobj(9)
    chunk = bytes(MiB)
    parts = [packer.compress(chunk) for _ in range(inflated // MiB)]
    parts.append(packer.flush())
    return b"".join(parts)


def _msgpack_call(text: str) -> bytes:
    """``{"args": [text, 0], "kwargs": {}}`` in msgpack (written by hand: no msgpack needed)."""
    raw = text.encode()
    return (
        b"\x82\xa4args\x92\xd9" + bytes([len(raw)]) + raw + b"\x00\xa6kwargs\x80"
        if len(raw) < 256
        else b"\x82\xa4args\x91\x00\xa6kwargs\x80"
    )


def _padded(prefix: bytes, suffix: bytes, size: int) -> bytes:
    """``prefix`` + filler + ``suffix``, ``size`` bytes in all (a JSON string's content)."""
    return prefix + b"x" * max(0, size - len(prefix) - len(suffix)) + suffix


def build_poison(
    kind: str,
    variant: str,
    message_id: str,
    *,
    task: str = "rel.work",
    marker: str = "mqtasks-poison-body",
    marker_file: str | os.PathLike[str] | None = None,
    max_size: int = MiB,
) -> Poison:
    """Build one poison message of ``kind`` and ``variant``.

    Args:
        kind: A letter of :data:`POISON_KINDS`.
        variant: One of that kind's variants.
        message_id: Its id (in the body as ``"<id>:<marker>"`` where it can carry text).
        task: A registered task taking ``(task_id, ms)`` (the harness's ``rel.work``).
        marker: Text put in every body that can carry it, found nowhere else.
        marker_file: The file the pickle of kind f would create (a temporary path by default).
        max_size: The consumers' ``max_message_size`` (kind d is one byte over it).

    Raises:
        KeyError: An unknown kind or variant.
    """
    if variant not in POISON_KINDS[kind].variants:
        raise KeyError(f"kind {kind!r} has no variant {variant!r}")
    text = f"{message_id}:{marker}"
    call = json.dumps({"args": [text, 0], "kwargs": {}}, separators=(",", ":")).encode()
    quoted = json.dumps(text).encode()
    head: dict[str, Any] = {HEADER_TASK: task}
    json_props: tuple[str | None, str | None] = ("application/json", "utf-8")
    body = call
    props = json_props
    send_id = True
    if kind == "a":
        body = {
            "truncated": b'{"args":[' + quoted + b",",
            "trailing-data": call + b" " + quoted,
            "invalid-utf8": b'{"args":[' + quoted + b',"\xff\xfe"],"kwargs":{}}',
            "nan": b'{"args":[' + quoted + b',NaN],"kwargs":{}}',
        }[variant]
    elif kind == "b":
        head = {HEADER_TASK: f"{task}.unregistered" if variant == "unregistered" else variant}
    elif kind == "c":
        calls: dict[str, list[Any]] = {
            "missing-arg": [text],
            "extra-arg": [text, 0, 1],
            "unknown-kwarg": [text, 0],
            "duplicate-arg": [text, 0],
        }
        args = calls[variant]
        kwargs = {"unknown-kwarg": {"speed": 1}, "duplicate-arg": {"ms": 0}}.get(variant, {})
        body = json.dumps({"args": args, "kwargs": kwargs}, separators=(",", ":")).encode()
    elif kind == "d":
        size = max_size + 1 if variant == "limit+1" else BIG_BODY
        body = _padded(b'{"args":[' + quoted + b',0,"', b'"],"kwargs":{}}', size)
    elif kind == "e":
        if variant == "text/plain":
            body, props = f"{task} {text} 0".encode(), ("text/plain", "utf-8")
        elif variant == "application/x-yaml":
            body = f"args: [{text!r}, 0]\nkwargs: {{}}\n".encode()
            props = ("application/x-yaml", "utf-8")
        elif variant == "application/x-msgpack":
            body, props = _msgpack_call(text), ("application/x-msgpack", "binary")
        else:
            props = (None, None)
    elif kind == "f":
        path = marker_file or os.path.join(tempfile.gettempdir(), f"mqtasks-pwned-{marker}")
        body = pickle.dumps(Pwn(os.fspath(path)))
        props = ("application/x-python-serialize", "binary")
    elif kind == "g":
        body = zlib_bomb()
        head = {**head, "compression": "application/x-gzip"}
    elif kind == "h":
        if variant == "missing-id":
            send_id = False
        elif variant.startswith("attempt="):
            head[HEADER_ATTEMPT] = {"attempt=-1": -1, "attempt=abc": "abc"}.get(variant, 10**9)
        elif variant == "expires-9999":
            head[HEADER_EXPIRES] = YEAR_9999
        elif variant == "1MiB-value":
            head["note"] = marker + "x" * (LONG_HEADER - len(marker))
        elif variant == "forged-x-death":
            head["x-death"] = "yes, twice"
        else:  # class-header: the task header is an object naming a class (jsonpickle style)
            head = {HEADER_TASK: {"py/type": f"{CLASS_MODULES[1]}.window"}}
    elif kind == "i":
        if variant.startswith("deep-"):
            nested = b"[" * DEEP_NESTING + b"]" * DEEP_NESTING
            body = b'{"args":[' + quoted + b"," + nested + b'],"kwargs":{}}'
        else:
            body = b'{"args":[' + quoted + b"," + b"9" * HUGE_INT_DIGITS + b'],"kwargs":{}}'
    return Poison(kind, variant, message_id, body, head, props[0], props[1], send_id)


class PoisonInjector:
    """Publishes poison to one app's broker past mqtasks' producer.

    RabbitMQ and ``memory://``: a raw kombu ``publish`` on one connection
    (persistent, and on RabbitMQ mandatory with publisher confirms, so a return
    means the broker has it). Redis (``redis://``): ``LPUSH`` of the element
    format. A header too long for RabbitMQ's frame (kind h's 1 MiB value) is cut
    to the longest the broker takes, found once by probing.

    Args:
        app: The app whose broker and queues are used (the queue must be declared).
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self.transport = app.transport
        self._conn: kombu.Connection | None = None
        self._producer: kombu.Producer | None = None
        self._room: dict[tuple[str, str, int], int] = {}
        #: ``(kind/variant, header, length sent)`` of headers cut to fit the broker.
        self.cut: dict[str, tuple[str, int]] = {}

    def __enter__(self) -> PoisonInjector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the publishing connection."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
        self._conn = self._producer = None

    @property
    def is_redis(self) -> bool:
        """Whether the broker is mqtasks' own Redis transport."""
        return isinstance(self.transport, ReliableRedisTransport)

    def _kombu(self) -> kombu.Producer:
        if self._producer is None:
            self._conn = self.transport.connection()
            self._conn.ensure_connection(max_retries=3)
            self._producer = self._conn.Producer()
        return self._producer

    def _kombu_publish(
        self, producer: kombu.Producer, queue: str, poison: Poison, *, mandatory: bool = True
    ) -> None:
        options: dict[str, Any] = {
            "routing_key": queue,
            "exchange": "",
            "headers": dict(poison.headers),
            "delivery_mode": 2,
            "retry": False,
        }
        if poison.send_id:
            options["message_id"] = poison.id
        if mandatory and isinstance(self.transport, AmqpTransport):
            options["mandatory"] = True  # a return raises: the queue must be there
        if poison.content_type is None:
            options["serializer"] = "raw"  # kombu's own default: application/data, binary
        else:
            options["content_type"] = poison.content_type
            options["content_encoding"] = poison.content_encoding or "binary"
        producer.publish(poison.body, **options)

    def inject(self, queue: str, poison: Poison) -> None:
        """Publish ``poison`` to ``queue``; return once the broker has it.

        Raises:
            Exception: Whatever kombu or redis-py raised (the broker did not take it).
        """
        if isinstance(self.transport, ReliableRedisTransport):
            meta = {
                "i": poison.id if poison.send_id else None,
                "h": dict(poison.headers),
                "t": poison.content_type,
                "e": poison.content_encoding,
                "p": None,
            }
            head = json.dumps(meta, separators=(",", ":")).encode()
            element = b"n" + head + b"\n" + poison.body
            self.transport.publisher().lpush(self.transport.queue_key(queue), element)
            return
        if isinstance(self.transport, AmqpTransport):
            poison = self._fit_headers(poison)
        try:
            self._kombu_publish(self._kombu(), queue, poison)
        except Exception:
            self.close()  # the broker may have closed the connection: the next call opens one
            raise

    def _fit_headers(self, poison: Poison) -> Poison:
        """Cut the longest string header to what one AMQP frame takes, if needed."""
        texts = [(len(v), k) for k, v in poison.headers.items() if isinstance(v, str)]
        if not texts or max(texts)[0] < 64 * 1024:
            return poison
        length, key = max(texts)
        shape = (poison.kind, poison.variant, len(poison.id))
        room = self._room.get(shape)
        if room is None:
            room = self._room[shape] = self._header_room(poison, key, length)
        if room >= length:
            return poison
        self.cut[f"{poison.kind}/{poison.variant}"] = (key, room)
        headers = {**poison.headers, key: str(poison.headers[key])[:room]}
        return replace(poison, headers=headers)

    def _header_room(self, poison: Poison, key: str, length: int) -> int:
        """The longest value of header ``key`` the broker takes with the rest of
        ``poison`` (bisection, published where no queue is bound; a frame too
        large closes the connection, so each probe has its own)."""
        value = str(poison.headers[key])
        low, high = 0, length + 1
        while high - low > 1:
            size = (low + high) // 2
            probe = replace(poison, headers={**poison.headers, key: value[:size]})
            try:
                with self.transport.connection() as conn:
                    conn.ensure_connection(max_retries=1)
                    producer = conn.Producer()
                    self._kombu_publish(producer, "mqtasks-poison-probe", probe, mandatory=False)
            except Exception:
                high = size
            else:
                low = size
        return low


def inject_poison(
    app: App,
    queue: str,
    kind: str,
    variant: str,
    message_id: str,
    **options: Any,
) -> Poison:
    """Build one poison message (see :func:`build_poison` for ``options``) and
    publish it to ``queue`` past mqtasks' producer; return it as built.

    ``max_size`` defaults to the app's ``max_message_size`` and ``task`` to ``rel.work``.
    """
    options.setdefault("max_size", app.settings.max_message_size)
    poison = build_poison(kind, variant, message_id, **options)
    with PoisonInjector(app) as injector:
        injector.inject(queue, poison)
    return poison


# -- workload -----------------------------------------------------------------------


class CheckTarget(Protocol):
    """Where criteria and figures go: a harness :class:`~reliability.harness.Run`
    or an in-process run of S15."""

    extra: dict[str, Any]

    def check(self, name: str, ok: bool, value: Any = None, want: str = "") -> bool:
        """Record one pass criterion."""
        ...


@dataclass(frozen=True)
class Planned:
    """A poison message to send: built just before it is injected (20 MiB bodies
    are not held longer than that)."""

    kind: str
    variant: str
    id: str


Item = Planned | Job


class PoisonWorkload:
    """Poison of every kind for one queue, the good tasks sent between, and the
    criteria the outcome is judged by.

    Args:
        app: The app (its broker, its ``rel.work`` task).
        queue: The work queue (declared here).
        ledger_dir: The run's ledger directory: poison ids are recorded in
            ``poison.jsonl`` (``intent`` then ``confirmed`` or ``failed``) and good
            tasks by a :class:`~reliability.harness.Publisher` in ``publisher-s7.jsonl``.
        n_kind: Messages per kind.
        new_id: Makes a fresh task id.
        marker_dir: Where the pickle's marker file would appear.
    """

    def __init__(
        self,
        app: App,
        queue: str,
        ledger_dir: Path,
        *,
        n_kind: int,
        new_id: Callable[[], str],
        marker_dir: Path,
    ) -> None:
        self.app = app
        self.queue = queue
        self.n_kind = n_kind
        self.new_id = new_id
        self.marker = f"POISONBODY{secrets.token_hex(6)}"
        self.marker_file = marker_dir / f"pwned-{self.marker}"
        self.plan: list[Planned] = [
            Planned(k, v, new_id())
            for k in POISON_KINDS
            for v, count in variant_counts(k, n_kind)
            for _ in range(count)
        ]
        self.kind_of = {p.id: p for p in self.plan}
        self.good: list[str] = []
        self.ledger = LedgerWriter(ledger_dir / "poison.jsonl")
        self.publisher = Publisher(app, LedgerWriter(ledger_dir / "publisher-s7.jsonl"), None)
        self.injector = PoisonInjector(app)
        #: Ids that ``delay()`` was asked to send and must not reach the work queue (j, oversized).
        self.refused_ids: set[str] = set()
        app.declare([queue])

    def close(self) -> None:
        """Close the injector and the ledgers."""
        self.injector.close()
        self.ledger.close()
        self.publisher.ledger.close()

    def good_jobs(self, n: int, rng: Any) -> list[Job]:
        """``n`` good ``rel.work`` jobs of 1-5 ms."""
        return [Job("rel.work", (self.new_id(), round(rng.uniform(1, 5), 2))) for _ in range(n)]

    def send(self, items: Sequence[Item]) -> None:
        """Publish ``items`` in order: good jobs through the publisher, poison injected."""
        limit = self.app.settings.max_message_size
        for item in items:
            if isinstance(item, Job):
                self.good.append(str(item.args[0]))
                self.publisher.publish(item)
                continue
            poison = build_poison(
                item.kind,
                item.variant,
                item.id,
                marker=self.marker,
                marker_file=self.marker_file,
                max_size=limit,
            )
            self.ledger.record("intent", item.id, poison=f"{item.kind}/{item.variant}")
            try:
                self.injector.inject(self.queue, poison)
            except Exception as exc:
                self.ledger.record("failed", item.id, error=f"{type(exc).__name__}: {exc}"[:300])
            else:
                self.ledger.record("confirmed", item.id)

    def unroutable(self, n: int) -> dict[str, Any]:
        """j: ``delay()`` ``n`` times to a queue deleted after mqtasks declared it.

        ``delay()`` declares a queue before its first publish, so a routing key
        nobody declared is declared, not unroutable; the case left is a queue
        deleted behind the app's back (an operator, a policy), which RabbitMQ
        returns and ``delay()`` must report as ``Unroutable``.
        """
        task = self.app.tasks["rel.work"]
        transport = self.app.transport
        raised: Counter[str] = Counter()
        specs: list[QueueSpec] = []
        for i in range(n):
            spec = QueueSpec(f"{self.queue}.gone{i}", queue_type="classic")
            specs += [spec, dead_letter_spec(spec)]
            transport.declare([spec])
            _delete_behind_back(self.app, spec.name)
            task_id = self.new_id()
            self.refused_ids.add(task_id)
            try:
                task.apply_async((task_id, 0), task_id=task_id, queue=spec.name)
            except MQTasksError as exc:
                raised[type(exc).__name__] += 1
            else:
                raised["returned"] += 1
        if not isinstance(transport, ReliableRedisTransport | MemoryTransport):
            with contextlib.suppress(Exception):
                transport.delete(specs)
        return dict(raised)

    def oversized(self, n: int) -> dict[str, Any]:
        """``delay()`` ``n`` times with an argument over ``max_message_size``."""
        task = self.app.tasks["rel.work"]
        big = "x" * (self.app.settings.max_message_size + 1)
        raised: Counter[str] = Counter()
        for _ in range(n):
            task_id = self.new_id()
            self.refused_ids.add(task_id)
            try:
                task.apply_async((task_id, big), task_id=task_id)
            except EncodeError:
                raised["EncodeError"] += 1
            except MQTasksError as exc:
                raised[type(exc).__name__] += 1
            else:
                raised["returned"] += 1
        return dict(raised)

    def record_dead_letters(self, ledger: LedgerWriter) -> dict[str, Any]:
        """Record every dead-letter entry of the queue as a ``dead`` event.

        An entry without the message's id (a message sent without one, or on
        Redis metadata too large to read) is recorded under the poison id its
        body carries; the variants that lost their id are returned.
        """
        entries = list_dead_letters(self.app, self.queue, limit=None)
        good = set(self.good)
        pattern = re.compile(rb'"([^"\\]{1,255}):' + re.escape(self.marker.encode()))
        without_id: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        for e in entries:
            task_id = e.id
            if task_id not in self.kind_of and task_id not in good:
                found = pattern.search(e.body[:4096])
                if found is not None:
                    task_id = found.group(1).decode(errors="replace")
                    planned = self.kind_of.get(task_id)
                    without_id[f"{planned.kind}/{planned.variant}" if planned else "?"] += 1
            if e.headers.get(HEADER_DEATH_DROPPED_HEADERS):
                planned = self.kind_of.get(task_id)
                dropped[f"{planned.kind}/{planned.variant}" if planned else task_id] += 1
            ledger.record(
                "dead",
                task_id or "<empty>",
                attempt=e.attempts,
                reason=e.reason,
                entry_id=e.id,
                detail=e.detail,
                queue=e.queue,
                body_bytes=len(e.body),
            )
        return {
            "entries": len(entries),
            "recorded_by_body_id": dict(without_id),
            "headers_dropped": dict(dropped),
        }

    def judge(
        self,
        target: CheckTarget,
        events: Sequence[Event],
        c: Classification,
        *,
        unroutable: dict[str, Any] | None,
        oversized: dict[str, Any] | None,
        expect_unroutable: bool,
    ) -> None:
        """Record S7's criteria on ``target`` (the ledger must hold the dead letters)."""
        n = self.n_kind
        by_kind: dict[str, Counter[str]] = {k: Counter() for k in POISON_KINDS}
        by_variant: dict[str, Counter[str]] = {}
        attempts_c: Counter[str] = Counter()
        for e in events:
            planned = self.kind_of.get(e.id)
            if e.kind != "dead" or planned is None:
                continue
            reason = str(e.info.get("reason"))
            by_kind[planned.kind][reason] += 1
            by_variant.setdefault(f"{planned.kind}/{planned.variant}", Counter())[reason] += 1
            if planned.kind == "c":
                attempts_c[str(e.attempt)] += 1
        target.extra["dead_by_variant"] = {k: dict(v) for k, v in sorted(by_variant.items())}
        for letter, kind in POISON_KINDS.items():
            found = dict(by_kind[letter])
            target.check(
                f"dead_{letter}",
                found == {kind.reason: n},
                found,
                f"{n} x {kind.reason} ({kind.title})",
            )
        target.check(
            "c_one_attempt", dict(attempts_c) == {"1": n}, dict(attempts_c), f"{n} x attempt 1"
        )
        good = set(self.good)
        poison_starts = Counter(e.id for e in events if e.kind == "start" and e.id not in good)
        target.check(
            "poison_executions",
            not poison_starts,
            sum(poison_starts.values()),
            "0 starts of any id but the good tasks'",
        )
        done = {e.id for e in events if e.kind == "done"}
        target.check("good_executed", good <= done, len(good & done), f"{len(good)}")
        target.check(
            "dead_duplicates", c.dead_duplicates == 0, c.dead_duplicates, "0 (one entry per id)"
        )
        target.check(
            "pickle_marker_absent",
            not self.marker_file.exists(),
            self.marker_file.exists(),
            "the pickle's file was never created",
        )
        seen = {e.id for e in events}
        leaked = sorted(self.refused_ids & seen)
        target.check(
            "refused_not_published",
            not leaked,
            len(leaked),
            "no id of j or the oversized delay() in the queue, the DLQ or a task",
        )
        if oversized is not None:
            target.extra["oversized_delay"] = oversized
            target.check(
                "oversized_delay_raises",
                oversized == {"EncodeError": n},
                oversized,
                f"{n} x EncodeError, before publishing",
            )
        if unroutable is not None:
            target.extra["unroutable_delay"] = unroutable
            if expect_unroutable:
                target.check(
                    "j_unroutable",
                    unroutable == {"Unroutable": n},
                    unroutable,
                    f"{n} x Unroutable, 0 DLQ entries",
                )


def _delete_behind_back(app: App, queue: str) -> None:
    """Delete ``queue`` without telling the app (which still believes it declared)."""
    transport = app.transport
    if isinstance(transport, ReliableRedisTransport):
        transport.publisher().delete(transport.queue_key(queue))
        return
    with transport.connection() as conn:
        conn.default_channel.queue_delete(queue)


def _interleaved(poison: Sequence[Planned], good: Sequence[Job], rng: Any) -> list[Item]:
    """Poison and good jobs in a random order."""
    items: list[Item] = [*poison, *good]
    rng.shuffle(items)
    return items


def _spaced(poison: Sequence[Planned], good: Sequence[Job]) -> list[Item]:
    """Each poison message followed by an equal share of the good jobs."""
    items: list[Item] = []
    per = len(good) // max(1, len(poison))
    rest = list(good)
    for p in poison:
        items.append(p)
        items += rest[:per]
        rest = rest[per:]
    return items + rest


# -- worker processes ---------------------------------------------------------------


def _status_kib(pid: int, field_name: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_peak(pid: int) -> bool:
    """Set the peak RSS (VmHWM) of ``pid`` to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _mapped_modules(pid: int) -> list[str]:
    """Which of :data:`CLASS_MODULES` process ``pid`` has loaded (its memory map)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    return [m for m in CLASS_MODULES if f"/{m}." in maps]


class _RssSampler:
    """Samples the workers' RSS every 0.2 s and keeps the maximum per phase and pid."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.phase = "baseline"
        self.peaks: dict[str, dict[int, float]] = {}
        self.timeline: list[tuple[float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="s7-rss", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        last = 0.0
        while not self._stop.wait(0.2):
            rss = {int(s["pid"]): float(s["rss_mib"]) for s in self.run.pool.stats()}
            peaks = self.peaks.setdefault(self.phase, {})
            for pid, v in rss.items():
                peaks[pid] = max(peaks.get(pid, 0.0), v)
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                self.timeline.append((self.run.rel(), rss))


def _wait_settled(run: Run, good: set[str], dead: int, timeout: float) -> float | None:
    """Wait until the ``good`` ids are done and the DLQ holds ``dead`` entries
    (or, the work queue empty, has stopped growing for 3 s: a poison message that
    is not dead-lettered is judged later); return the seconds it took (None on timeout)."""
    spec = run.app.queue(run.queue)
    dead_spec = dead_letter_spec(spec)
    t0 = time.monotonic()
    last, since = -1, t0
    while time.monotonic() - t0 < timeout:
        done = {e.id for e in run.events() if e.kind == "done"}
        try:
            counts = run.app.transport.message_counts([spec, dead_spec])
        except MQTasksError:
            counts = {}
        ready, in_dlq = counts.get(spec.name, -1), counts.get(dead_spec.name, 0)
        if in_dlq != last:
            last, since = in_dlq, time.monotonic()
        stalled = ready == 0 and time.monotonic() - since >= 3.0
        if good <= done and (in_dlq >= dead or stalled):
            return round(time.monotonic() - t0, 2)
        time.sleep(0.2)
    run.notes.append(f"phase not settled after {timeout:.0f} s")
    return None


def _peaks(run: Run, reset: bool) -> dict[int, float]:
    """Each worker's peak RSS in MiB since the last reset (VmHWM); reset it again if asked."""
    out: dict[int, float] = {}
    for pid in run.pool.pids().values():
        hwm = _status_kib(pid, "VmHWM")
        if hwm is not None:
            out[pid] = round(hwm / 1024, 1)
        if reset:
            _reset_peak(pid)
    return out


def _rss_check(
    run: Run,
    name: str,
    baseline: dict[int, float],
    hwm: dict[int, float],
    sampled: dict[int, float],
    bound: float,
    what: str,
) -> None:
    growth = {
        pid: round(max(hwm.get(pid, 0.0), sampled.get(pid, 0.0)) - base, 1)
        for pid, base in baseline.items()
    }
    run.check(
        name,
        bool(growth) and all(g < bound for g in growth.values()),
        growth,
        f"peak RSS < baseline + {bound:.0f} MiB per worker ({what})",
    )


def s7(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Poison messages: every kind dead-lettered with its reason, never run, the
    good tasks between them all executed, worker memory bounded, no body logged."""
    with h.run("S7", broker) as run:
        started = time.time()
        n_good = h.profile.n(1000)
        n_kind = h.profile.n(100)
        workload = PoisonWorkload(
            run.app, run.queue, run.ledger_dir, n_kind=n_kind, new_id=run.new_id, marker_dir=run.dir
        )
        run.publisher = workload.publisher
        try:
            return _s7_run(run, workload, n_good, started)
        finally:
            workload.close()


def _s7_run(run: Run, workload: PoisonWorkload, n_good: int, started: float) -> dict[str, Any]:
    n_kind = workload.n_kind
    big = [p for p in workload.plan if p.variant == "20MiB"]
    light = [p for p in workload.plan if p.variant != "20MiB"]
    warm = min(10, n_good)
    n_big_good = min(BIG_BODY_GAP * len(big), (n_good - warm) // 2)
    jobs = workload.good_jobs(n_good, run.rng)
    warm_jobs, jobs_b, jobs_a = (
        jobs[:warm],
        jobs[warm : warm + n_big_good],
        jobs[warm + n_big_good :],
    )
    run.pool.start()
    time.sleep(1.5)
    sampler = _RssSampler(run)
    sampler.start()
    try:
        # Baseline: workers at rest after a few good tasks.
        workload.send(warm_jobs)
        _wait_settled(run, {str(j.args[0]) for j in warm_jobs}, 0, 60)
        time.sleep(0.5)
        baseline: dict[int, float] = {}
        for pid in run.pool.pids().values():
            rss = _status_kib(pid, "VmRSS")
            if rss is not None:
                baseline[pid] = round(rss / 1024, 1)
        resets = [_reset_peak(pid) for pid in baseline]
        if not all(resets):
            run.notes.append("peak RSS could not be reset (clear_refs): peaks are lifetime peaks")
        imported_before = {pid: _mapped_modules(pid) for pid in baseline}
        # Phase A: every kind but the 20 MiB bodies, shuffled among good tasks.
        sampler.phase = "A"
        t_a = time.time()
        workload.send(_interleaved(light, jobs_a, run.rng))
        run.extra["phase_a_publish_s"] = round(time.time() - t_a, 1)
        settled_a = _wait_settled(
            run, {str(j.args[0]) for j in [*warm_jobs, *jobs_a]}, len(light), 120
        )
        hwm_a = _peaks(run, reset=True)
        # Phase B: the 20 MiB bodies, each followed by its share of good tasks.
        sampler.phase = "B"
        t_b = time.time()
        workload.send(_spaced(big, jobs_b))
        run.extra["phase_b_publish_s"] = round(time.time() - t_b, 1)
        settled_b = _wait_settled(run, set(workload.good), len(workload.plan), 180)
        hwm_b = _peaks(run, reset=False)
        sampler.phase = "end"
        # j and the oversized argument: delay() itself must refuse.
        unroutable = workload.unroutable(n_kind)
        oversized = workload.oversized(n_kind)
        ok = run.wait_quiescent(120)
    finally:
        sampler.stop()
    imported_after = {pid: _mapped_modules(pid) for pid in run.pool.pids().values()}
    run.check("quiescent", ok, ok, "within 120 s")
    run.extra["settle_s"] = {"A": settled_a, "B": settled_b}
    run.extra["dlq"] = workload.record_dead_letters(run.ledger)
    run.extra["headers_cut_to_fit"] = {
        k: {"header": key, "length": length} for k, (key, length) in workload.injector.cut.items()
    }
    events = run.events()
    c = classify(events)
    run.standard_checks(c, dead=None)
    workload.judge(
        run,
        events,
        c,
        unroutable=unroutable,
        oversized=oversized,
        expect_unroutable=not run.is_redis,
    )
    # Worker processes: no crash, memory bounded, no body in the logs, nothing imported.
    exits = [{"slot": e.slot, "pid": e.pid, "code": e.code} for e in run.pool.exits]
    run.check("worker_crashes", not exits, len(exits), "0 worker exits during the run")
    run.extra["rss_mib"] = {
        "baseline": baseline,
        "hwm_a": hwm_a,
        "hwm_b": hwm_b,
        "sampled_max": sampler.peaks,
        "timeline": sampler.timeline[-120:],
    }
    _rss_check(
        run,
        "rss_g_i",
        baseline,
        hwm_a,
        sampler.peaks.get("A", {}),
        64.0,
        "every kind but the 20 MiB bodies, g and i included",
    )
    _rss_check(
        run,
        "rss_20mib",
        baseline,
        hwm_b,
        sampler.peaks.get("B", {}),
        128.0,
        f"{len(big)} bodies of 20 MiB",
    )
    bodies_logged = run.log_count(workload.marker)
    run.check("no_body_in_logs", bodies_logged == 0, bodies_logged, "0 lines with a poison body")
    run.check(
        "class_not_imported",
        not any(imported_before.values()) and not any(imported_after.values()),
        {"before": imported_before, "after": imported_after},
        f"{', '.join(CLASS_MODULES)} never loaded by a worker (named by b and h)",
    )
    run.extra["poison_per_kind"] = n_kind
    run.extra["good"] = len(workload.good)
    run.extra["big_body_gap"] = len(jobs_b) // max(1, len(big))
    _notes(run, workload)
    return run.result(c, started=started)


def _notes(run: Run, workload: PoisonWorkload) -> None:
    cut = workload.injector.cut
    if cut:
        lengths = sorted({length for _, length in cut.values()})
        run.notes.append(
            "h/1MiB-value: RabbitMQ carries all headers in one frame (frame_max 131072), so "
            f"a 1 MiB header cannot be published; the value sent is the longest the broker "
            f"takes ({lengths} characters)."
        )
    by_body = run.extra.get("dlq", {}).get("recorded_by_body_id", {})
    if by_body:
        run.notes.append(
            f"dead-letter entries without the message id, matched by the id in the body: "
            f"{by_body} (a message sent without an id; on Redis, metadata over 1 MiB is "
            "refused before its id is read)."
        )
    if run.is_redis:
        run.notes.append(
            "j: Redis has no routing and no mandatory flag, so delay() to a deleted queue "
            "succeeds (the message waits in a list nobody consumes); reported as "
            "unroutable_delay, not a criterion here (docs/guide/transports.rst says so)."
        )
    run.notes.append(
        f"The 20 MiB bodies are spaced by {BIG_BODY_GAP} good tasks: a prefetch window "
        "taken from a backlog holds one of them at most."
    )
    failed = {ch["check"] for ch in run.checks if not ch["ok"]}
    if run.is_redis and "rss_20mib" in failed:
        run.notes.append(
            "rss_20mib on Redis: a worker holds a 20 MiB message as its list element plus "
            "a copy of the body (40 MiB), builds a third copy to dead-letter it, and "
            "redis-py's pure-Python parser needs about 3 x the element while reading one; "
            "a worker whose I/O thread takes the next 20 MiB element while its task "
            "thread dead-letters the last one goes past +128 MiB (with glibc's heap growth)."
        )


# -- S15: memory:// in process ------------------------------------------------------


class MemoryPoisonRun(CheckTarget, Protocol):
    """What :func:`memory_poison_part` needs of S15's in-process run."""

    app: App
    queue: str
    ledger_dir: Path
    ledger: LedgerWriter


def memory_poison_part(h: Harness, run: MemoryPoisonRun) -> None:
    """S7 in process on ``memory://`` (for S15), with a worker of ``run.app`` running.

    Injects every kind among good tasks, waits until the worker has settled
    them (60 s at most), records the dead letters in ``run.ledger`` (under the
    poison ids: the caller must not record them again) and checks S7's criteria
    on ``run``. Worker memory, logs and crashes are not judged here: the worker
    is this process.
    """
    import random

    rng = random.Random(f"{h.seed}-S15-S7")
    n_kind = h.profile.n(100)
    workload = PoisonWorkload(
        run.app,
        run.queue,
        run.ledger_dir,
        n_kind=n_kind,
        new_id=lambda: f"S15-S7-{rng.getrandbits(64):016x}",
        marker_dir=run.ledger_dir.parent,
    )
    try:
        before = [m for m in CLASS_MODULES if m in sys.modules]
        jobs = workload.good_jobs(h.profile.n(1000), rng)
        workload.send(_interleaved(workload.plan, jobs, rng))
        unroutable = workload.unroutable(n_kind)
        oversized = workload.oversized(n_kind)
        spec = run.app.queue(run.queue)
        dead_spec = dead_letter_spec(spec)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counts = run.app.transport.message_counts([spec, dead_spec])
            done = {e.id for e in _events(run.ledger_dir) if e.kind == "done"}
            settled = not counts[spec.name] and counts[dead_spec.name] >= len(workload.plan)
            if settled and set(workload.good) <= done:
                break
            time.sleep(0.1)
        run.extra["dlq"] = workload.record_dead_letters(run.ledger)
        events = _events(run.ledger_dir)
        workload.judge(
            run,
            events,
            classify(events),
            unroutable=unroutable,
            oversized=oversized,
            expect_unroutable=False,
        )
        run.extra["unroutable_note"] = (
            "memory:// has no mandatory routing: delay() to a queue deleted behind the "
            "app's back returns (reported, not a criterion; RabbitMQ raises Unroutable)."
        )
        after = [m for m in CLASS_MODULES if m in sys.modules]
        run.check(
            "class_not_imported",
            not before and not after,
            {"before": before, "after": after},
            f"{', '.join(CLASS_MODULES)} never imported (named by b and h)",
        )
    finally:
        workload.close()


def _events(ledger_dir: Path) -> list[Event]:
    from .ledger import read_ledger

    events, _ = read_ledger(ledger_dir)
    return events
