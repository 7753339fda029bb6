"""Replayable event streams at the transport level: what a stream is, its entries, and the
interface the brokers that keep streams implement.

A stream keeps every event appended to it (up to its retention), in order,
whoever has read it; subscriber *groups* each keep their own position in it.
:class:`StreamStore` is what a transport offers (``transport.streams()``, when
:attr:`Capabilities.streams <mqtasks.transport.base.Capabilities.streams>`);
it moves opaque envelopes and knows routing keys, never tasks. The RabbitMQ
(stream queues), Redis (Redis Streams) and in-process implementations live
beside their transports.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..exceptions import ConfigurationError
from .envelope import Envelope

__all__ = [
    "HEADER_STREAM_KEY",
    "StartAt",
    "StreamEntry",
    "StreamInfo",
    "StreamReader",
    "StreamSpec",
    "StreamStore",
    "check_start",
    "parse_duration",
]

#: Header: the routing key (event name) an entry was appended under.
HEADER_STREAM_KEY = "mqtasks-stream-key"

#: Where a group starts reading: ``"first"`` (the oldest retained entry), ``"last"``
#: (only entries appended after the group is created), an aware ``datetime`` (the
#: first entry appended at or after it) or an integer offset (the entry's position
#: counted from the stream's first entry ever, 0-based).
StartAt = str | datetime | int

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(value: float | timedelta | str | None) -> float | None:
    """Return ``value`` in seconds: a number, a ``timedelta`` or ``"30s"``, ``"15m"``,
    ``"12h"``, ``"7d"``, ``"2w"``; None stays None.

    Raises:
        ConfigurationError: Not a positive duration.
    """
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ConfigurationError(
            f"Retention {value!r} is not a duration: give seconds, a timedelta or a string "
            "such as '30s', '15m', '12h', '7d', '2w'."
        )
    if seconds <= 0:
        raise ConfigurationError(f"Retention {value!r} must be positive.")
    return seconds


def check_start(start: StartAt) -> StartAt:
    """Return ``start`` if a group can start there.

    Raises:
        ConfigurationError: Not ``"first"``, ``"last"``, an aware datetime or an offset >= 0.
    """
    if isinstance(start, str) and start in ("first", "last"):
        return start
    if isinstance(start, datetime):
        if start.tzinfo is None:
            raise ConfigurationError(
                f"start={start!r} is a naive datetime; give an aware one "
                "(datetime(..., tzinfo=timezone.utc))."
            )
        return start
    if isinstance(start, int) and not isinstance(start, bool) and start >= 0:
        return start
    raise ConfigurationError(
        f"start={start!r}: give 'first' (the oldest retained entry), 'last' (only new "
        "entries), an aware datetime, or an offset (an integer >= 0)."
    )


@dataclass(frozen=True)
class StreamSpec:
    """A stream: a named, retained, replayable log of events.

    Args:
        name: The stream's name (``orders``).
        retention: How long entries are kept: seconds, a ``timedelta`` or ``"7d"``;
            None: kept until ``max_length``/``max_bytes`` drops them (or for ever).
        max_length: Most entries kept (Redis, ``memory://``); the oldest go first.
            Redis trims approximately (``MAXLEN ~``), by whole nodes.
        max_bytes: Most bytes kept (RabbitMQ ``x-max-length-bytes``), by whole segments.
        segment_bytes: RabbitMQ segment file size (``x-stream-max-segment-size-bytes``):
            retention drops whole segments, so smaller segments drop sooner.
        claim_after: Seconds after which a dead reader's unacknowledged entries are
            taken over by another reader of its group (Redis ``XAUTOCLAIM``).
    """

    name: str
    retention: float | timedelta | str | None = None
    max_length: int | None = None
    max_bytes: int | None = None
    segment_bytes: int | None = None
    claim_after: float = 30.0

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,200}", self.name):
            raise ConfigurationError(
                f"Stream name {self.name!r}: 1 to 200 letters, digits, '_', '.', ':' or '-'."
            )
        object.__setattr__(self, "retention", parse_duration(self.retention))
        for option in ("max_length", "max_bytes", "segment_bytes"):
            value = getattr(self, option)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"Stream {self.name!r}: {option} must be an int >= 1.")
        if self.claim_after <= 0:
            raise ConfigurationError(f"Stream {self.name!r}: claim_after must be positive.")

    @property
    def retention_seconds(self) -> float | None:
        """The retention in seconds (None: no time bound)."""
        return self.retention  # type: ignore[return-value]  # normalised in __post_init__


@dataclass(frozen=True)
class StreamEntry:
    """One entry of a stream, as read.

    Attributes:
        id: The broker's id of the entry (RabbitMQ: its offset; Redis: ``ms-seq``).
        offset: Its position from the stream's first entry ever (None where unknown).
        key: The routing key (event name) it was appended under.
        envelope: What was appended.
        at: When it was appended (epoch seconds), where the broker tells.
    """

    id: str
    offset: int | None
    key: str
    envelope: Envelope
    at: float | None = None


@dataclass(frozen=True)
class StreamInfo:
    """What a broker tells about a stream (``mqtasks stream ls``)."""

    name: str
    exists: bool = True
    length: int | None = None
    first: str | None = None
    last: str | None = None
    groups: tuple[str, ...] = ()


class StreamReader:
    """A group's reader of a stream: entries in, committed positions out.

    At least once: entries read and not committed are read again (by this
    group's next reader) after a crash. One thread drives it.
    """

    def read(self, count: int, timeout: float) -> list[StreamEntry]:
        """Return up to ``count`` entries past the group's position, waiting up to ``timeout``.

        Returns an empty list when none came (or when another reader of the
        group holds the stream, on brokers where one reader reads at a time).
        """
        raise NotImplementedError

    def commit(self, entries: Sequence[StreamEntry]) -> None:
        """Record ``entries`` (the last ones :meth:`read` returned) as done for the group."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of the connection (and of the group's lease, where there is one)."""


class StreamStore:
    """The streams of one broker (``transport.streams()``)."""

    def declare(self, spec: StreamSpec) -> None:
        """Create the stream with its retention (idempotent).

        Raises:
            ConfigurationError: The broker cannot honour an option of ``spec``.
            TransportError: The broker refused (a stream that exists with other arguments).
        """
        raise NotImplementedError

    def append(self, stream: str, key: str, envelope: Envelope) -> str:
        """Append ``envelope`` under routing key ``key``; return once the broker has it.

        Returns:
            The entry's id, where the broker tells at once ("" otherwise).

        Raises:
            PublishError: The broker did not take it.
        """
        raise NotImplementedError

    def reader(self, spec: StreamSpec, group: str, start: StartAt) -> StreamReader:
        """Return a reader for ``group``, created at ``start`` if it does not exist yet."""
        raise NotImplementedError

    def info(self, spec: StreamSpec, groups: Sequence[str] = ()) -> StreamInfo:
        """Return the stream's length, first and last entry ids (``exists=False`` if absent)."""
        raise NotImplementedError

    def entries(self, spec: StreamSpec, start: StartAt, limit: int) -> list[StreamEntry]:
        """Return up to ``limit`` entries from ``start`` on, without any group's position moving."""
        raise NotImplementedError

    def rewind(self, spec: StreamSpec, group: str, start: StartAt) -> None:
        """Set ``group``'s position to ``start`` (created if absent).

        Its readers should be stopped: a running one may commit over it.
        """
        raise NotImplementedError

    def delete(self, spec: StreamSpec, groups: Sequence[str] = ()) -> None:
        """Delete the stream and the positions of ``groups`` (tests and tooling)."""
        raise NotImplementedError
