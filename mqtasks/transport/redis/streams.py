"""Streams of ``redis://``: Redis Streams with consumer groups.

An entry is ``XADD``-ed with its routing key, message id, headers and body as
fields, trimmed on the way in (``MINID ~`` for a retention, ``MAXLEN ~`` for a
length). A group is a Redis consumer group: readers share its entries
(``XREADGROUP``), acknowledge them once handed on (``XACK``), and take over a
dead reader's pending entries once idle for ``claim_after`` (``XAUTOCLAIM``).
Integer offsets count entries from the stream's first one ever
(``XINFO STREAM``'s ``entries-added``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import redis

from ...exceptions import ConfigurationError
from ..envelope import Envelope
from ..errors import translate_errors
from ..stream import StartAt, StreamEntry, StreamInfo, StreamReader, StreamSpec, StreamStore

if TYPE_CHECKING:
    from . import RedisTransport

__all__ = ["RedisStreams"]

#: The highest sequence number of a Redis stream id (so ``ms-MAX`` sorts after every id of ms).
_MAX_SEQ = 18446744073709551615


def _fields(key: str, envelope: Envelope) -> dict[str, Any]:
    return {
        "k": key,
        "i": envelope.message_id,
        "h": json.dumps(dict(envelope.headers), separators=(",", ":")),
        "t": envelope.content_type,
        "e": envelope.content_encoding,
        "b": envelope.body,
    }


def _entry(raw_id: bytes, fields: dict[bytes, bytes]) -> StreamEntry:
    entry_id = raw_id.decode()
    headers = json.loads(fields.get(b"h", b"{}"))
    envelope = Envelope(
        body=fields.get(b"b", b""),
        message_id=fields.get(b"i", b"").decode(),
        headers=headers if isinstance(headers, dict) else {},
        content_type=fields.get(b"t", b"application/json").decode(),
        content_encoding=fields.get(b"e", b"utf-8").decode(),
    )
    at = int(entry_id.split("-", 1)[0]) / 1000.0
    return StreamEntry(entry_id, None, fields.get(b"k", b"").decode(), envelope, at)


class RedisStreams(StreamStore):
    """The Redis Streams of one :class:`~mqtasks.transport.redis.RedisTransport`."""

    def __init__(self, transport: RedisTransport) -> None:
        self.transport = transport
        self._specs: dict[str, StreamSpec] = {}

    def key(self, stream: str) -> str:
        """The Redis key of ``stream``."""
        return f"{self.transport.key_prefix}:stream:{stream}"

    def _client(self) -> redis.Redis[bytes]:
        return self.transport.publisher()

    def declare(self, spec: StreamSpec) -> None:
        if spec.max_bytes is not None or spec.segment_bytes is not None:
            raise ConfigurationError(
                f"Stream {spec.name!r}: Redis trims streams by entries and age; replace "
                "max_bytes/segment_bytes (RabbitMQ options) by max_length or retention."
            )
        self._specs[spec.name] = spec

    def append(self, stream: str, key: str, envelope: Envelope) -> str:
        spec = self._specs.get(stream)
        trim: dict[str, Any] = {}
        if spec is not None and spec.retention_seconds is not None:
            trim = {
                "minid": int((time.time() - spec.retention_seconds) * 1000),
                "approximate": True,
            }
        elif spec is not None and spec.max_length is not None:
            trim = {"maxlen": spec.max_length, "approximate": True}
        with translate_errors(self.transport.url, f"append to stream {stream!r}"):
            client = self._client()
            if spec is not None and spec.retention_seconds is not None and spec.max_length:
                pipe = client.pipeline(transaction=False)
                pipe.xadd(self.key(stream), _fields(key, envelope), **trim)  # type: ignore[arg-type]
                pipe.xtrim(self.key(stream), maxlen=spec.max_length, approximate=True)
                entry_id = pipe.execute()[0]
            else:
                entry_id = client.xadd(self.key(stream), _fields(key, envelope), **trim)  # type: ignore[arg-type]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def start_id(self, spec: StreamSpec, start: StartAt) -> str:
        """Return the group position (the id of the last entry delivered) for ``start``."""
        if start == "first":
            return "0"
        if start == "last":
            return "$"
        if isinstance(start, datetime):
            return f"{int(start.timestamp() * 1000) - 1}-{_MAX_SEQ}"
        client, key = self._client(), self.key(spec.name)
        if not client.exists(key):
            return "0"
        info = client.xinfo_stream(key)
        first_offset = int(info.get("entries-added", info["length"])) - int(info["length"])
        skip = int(start) - first_offset
        if skip <= 0:
            return "0"
        found = client.xrange(key, "-", "+", count=skip)
        return found[-1][0].decode() if found else "$"

    def _ensure_group(self, spec: StreamSpec, group: str, start: StartAt) -> None:
        client = self._client()
        try:
            client.xgroup_create(
                self.key(spec.name), group, self.start_id(spec, start), mkstream=True
            )
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def reader(self, spec: StreamSpec, group: str, start: StartAt) -> StreamReader:
        with translate_errors(self.transport.url, f"create group {group!r} of {spec.name!r}"):
            self._specs.setdefault(spec.name, spec)
            self._ensure_group(spec, group, start)
        return _RedisReader(self, spec, group)

    def info(self, spec: StreamSpec, groups: Sequence[str] = ()) -> StreamInfo:
        key = self.key(spec.name)
        with translate_errors(self.transport.url, f"read stream {spec.name!r}"):
            client = self._client()
            if not client.exists(key):
                return StreamInfo(spec.name, exists=False)
            info = client.xinfo_stream(key)
            names = tuple(g["name"].decode() for g in client.xinfo_groups(key))  # type: ignore[no-untyped-call]
        first, last = info.get("first-entry"), info.get("last-entry")
        return StreamInfo(
            spec.name,
            True,
            int(info["length"]),
            first[0].decode() if first else None,
            last[0].decode() if last else None,
            names,
        )

    def entries(self, spec: StreamSpec, start: StartAt, limit: int) -> list[StreamEntry]:
        with translate_errors(self.transport.url, f"read stream {spec.name!r}"):
            after = self.start_id(spec, start)
            if after == "$":
                return []
            low = "-" if after == "0" else f"({after}"
            found = self._client().xrange(self.key(spec.name), low, "+", count=limit)
        return [_entry(i, f) for i, f in found]

    def rewind(self, spec: StreamSpec, group: str, start: StartAt) -> None:
        with translate_errors(self.transport.url, f"rewind group {group!r} of {spec.name!r}"):
            self._ensure_group(spec, group, start)
            self._client().xgroup_setid(self.key(spec.name), group, self.start_id(spec, start))

    def delete(self, spec: StreamSpec, groups: Sequence[str] = ()) -> None:
        with translate_errors(self.transport.url, f"delete stream {spec.name!r}"):
            self._client().delete(self.key(spec.name))


class _RedisReader(StreamReader):
    """One consumer of a group: claims a dead reader's pending entries, then reads new ones."""

    def __init__(self, store: RedisStreams, spec: StreamSpec, group: str) -> None:
        self.store, self.spec, self.group = store, spec, group
        self.key = store.key(spec.name)
        self.name = f"c-{uuid.uuid4().hex[:12]}"
        # Its own connection: XREADGROUP BLOCK holds it for the wait.
        self.client = store.transport.client(single_connection=True)
        self._claim_cursor = "0-0"
        self._next_claim = 0.0

    def _claim(self, count: int) -> list[StreamEntry]:
        idle_ms = int(self.spec.claim_after * 1000)
        result = self.client.xautoclaim(
            self.key, self.group, self.name, idle_ms, self._claim_cursor, count=count
        )
        cursor, claimed = result[0], result[1]
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if self._claim_cursor == "0-0":
            self._next_claim = time.monotonic() + min(self.spec.claim_after / 2, 5.0)
        return [_entry(i, f) for i, f in claimed if f is not None]

    def read(self, count: int, timeout: float) -> list[StreamEntry]:
        with translate_errors(self.store.transport.url, f"read stream {self.spec.name!r}"):
            if time.monotonic() >= self._next_claim:
                claimed = self._claim(count)
                if claimed:
                    return claimed
            found = self.client.xreadgroup(
                self.group,
                self.name,
                {self.key: ">"},
                count=count,
                block=max(1, int(timeout * 1000)),
            )
        if not found:
            return []
        return [_entry(i, f) for i, f in found[0][1] if f is not None]

    def commit(self, entries: Sequence[StreamEntry]) -> None:
        if entries:
            with translate_errors(self.store.transport.url, f"ack stream {self.spec.name!r}"):
                self.client.xack(self.key, self.group, *[e.id for e in entries])  # type: ignore[no-untyped-call]

    def close(self) -> None:
        try:
            pending = self.client.xpending_range(
                self.key, self.group, "-", "+", 1, consumername=self.name
            )
            if not pending:  # nothing left to claim from it: leave no dead consumer behind
                self.client.xgroup_delconsumer(self.key, self.group, self.name)  # type: ignore[no-untyped-call]
        except redis.RedisError:
            pass
        self.client.close()
