"""Streams of ``memory://``: a list per stream and a position per group, in this process.

As quick as the rest of ``memory://`` and as forgetful: nothing survives the
process. One reader of a group reads at a time (a lease), as on RabbitMQ.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from ..exceptions import ConfigurationError
from .envelope import Envelope
from .stream import StartAt, StreamEntry, StreamInfo, StreamReader, StreamSpec, StreamStore

__all__ = ["MemoryStreams"]


@dataclass
class _Stream:
    entries: list[StreamEntry] = field(default_factory=list)
    #: Offset of the next entry appended.
    next_offset: int = 0
    #: Group -> offset of the next entry it reads.
    groups: dict[str, int] = field(default_factory=dict)
    #: Group -> the reader holding it.
    leases: dict[str, str] = field(default_factory=dict)
    #: Its retention, once declared.
    spec: StreamSpec | None = None


class MemoryStreams(StreamStore):
    """Every stream of this process (class-level, as kombu's ``memory://`` queues are)."""

    _streams: dict[str, _Stream] = {}
    _cond = threading.Condition()

    @classmethod
    def reset(cls) -> None:
        """Forget every stream (``MemoryTransport.reset``)."""
        with cls._cond:
            cls._streams.clear()

    def _get(self, name: str) -> _Stream:
        return self._streams.setdefault(name, _Stream())

    def declare(self, spec: StreamSpec) -> None:
        if spec.max_bytes is not None or spec.segment_bytes is not None:
            raise ConfigurationError(
                f"Stream {spec.name!r}: memory:// bounds streams by max_length and "
                "retention; remove max_bytes/segment_bytes (RabbitMQ options)."
            )
        with self._cond:
            self._get(spec.name).spec = spec

    @staticmethod
    def _trim(stream: _Stream) -> None:
        # Drop what is past the retention and the length, on each append.
        spec, entries = stream.spec, stream.entries
        if spec is None:
            return
        if spec.retention_seconds is not None:
            horizon = time.time() - spec.retention_seconds
            entries = [e for e in entries if (e.at or 0) >= horizon]
        if spec.max_length is not None and len(entries) > spec.max_length:
            entries = entries[-spec.max_length :]
        stream.entries = entries

    def append(self, stream: str, key: str, envelope: Envelope) -> str:
        with self._cond:
            s = self._get(stream)
            offset = s.next_offset
            s.next_offset += 1
            s.entries.append(StreamEntry(str(offset), offset, key, envelope, time.time()))
            self._trim(s)
            self._cond.notify_all()
        return str(offset)

    def _resolve(self, s: _Stream, start: StartAt) -> int:
        if start == "first":
            return s.entries[0].offset or 0 if s.entries else s.next_offset
        if start == "last":
            return s.next_offset
        if isinstance(start, datetime):
            stamp = start.timestamp()
            later = [e.offset for e in s.entries if (e.at or 0) >= stamp]
            return (later[0] or 0) if later else s.next_offset
        return int(start)

    def reader(self, spec: StreamSpec, group: str, start: StartAt) -> StreamReader:
        with self._cond:
            s = self._get(spec.name)
            if group not in s.groups:
                s.groups[group] = self._resolve(s, start)
        return _MemoryReader(self, spec.name, group)

    def info(self, spec: StreamSpec, groups: Sequence[str] = ()) -> StreamInfo:
        with self._cond:
            s = self._streams.get(spec.name)
            if s is None:
                return StreamInfo(spec.name, exists=False)
            first = s.entries[0].id if s.entries else None
            last = s.entries[-1].id if s.entries else None
            return StreamInfo(spec.name, True, len(s.entries), first, last, tuple(s.groups))

    def entries(self, spec: StreamSpec, start: StartAt, limit: int) -> list[StreamEntry]:
        with self._cond:
            s = self._get(spec.name)
            begin = self._resolve(s, start)
            return [e for e in s.entries if (e.offset or 0) >= begin][:limit]

    def rewind(self, spec: StreamSpec, group: str, start: StartAt) -> None:
        with self._cond:
            s = self._get(spec.name)
            s.groups[group] = self._resolve(s, start)

    def delete(self, spec: StreamSpec, groups: Sequence[str] = ()) -> None:
        with self._cond:
            self._streams.pop(spec.name, None)


class _MemoryReader(StreamReader):
    def __init__(self, store: MemoryStreams, stream: str, group: str) -> None:
        self.store, self.stream, self.group = store, stream, group
        self.id = uuid.uuid4().hex

    def _holds(self, s: _Stream) -> bool:
        holder = s.leases.setdefault(self.group, self.id)
        return holder == self.id

    def read(self, count: int, timeout: float) -> list[StreamEntry]:
        deadline = time.monotonic() + timeout
        with self.store._cond:
            while True:
                s = self.store._get(self.stream)
                if self._holds(s):
                    position = s.groups.get(self.group, 0)
                    found = [e for e in s.entries if (e.offset or 0) >= position][:count]
                    if found:
                        return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self.store._cond.wait(remaining)

    def commit(self, entries: Sequence[StreamEntry]) -> None:
        if not entries:
            return
        with self.store._cond:
            s = self.store._get(self.stream)
            if self._holds(s):
                s.groups[self.group] = (entries[-1].offset or 0) + 1

    def close(self) -> None:
        with self.store._cond:
            s = self.store._streams.get(self.stream)
            if s is not None and s.leases.get(self.group) == self.id:
                del s.leases[self.group]
                self.store._cond.notify_all()
