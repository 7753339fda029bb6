"""The poison kinds a to i of the protocol, and how to build one message of each.

:data:`POISON_KINDS` lists the kinds with their sub-variants and the
dead-letter reason each must end with; :func:`build_poison` makes one message
as it goes on the wire.

Every poison body that can carry text carries ``"<id>:<marker>"``: the id maps
a dead-letter entry back to its poison when the entry lost its id (a message
without one, or on Redis metadata too large to read), and the marker, found in
no other message, shows whether a worker wrote a body to its log.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mqtasks.message import HEADER_ATTEMPT, HEADER_EXPIRES, HEADER_TASK

__all__ = [
    "CLASS_MODULES",
    "KIND_REASONS",
    "POISON_KINDS",
    "Poison",
    "PoisonKind",
    "build_poison",
    "variant_counts",
    "zlib_bomb",
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
