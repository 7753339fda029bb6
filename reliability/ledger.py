"""The ledger: what happened to every task id, recorded outside the broker.

Each process appends JSON lines to a file of its own, opened with ``O_APPEND``
and ``fsync``-ed after every line, so a SIGKILL loses at most the line being
written (a torn last line is skipped and counted). :func:`classify` turns the
events of all files into the protocol's figures (Jepsen's vocabulary):

* ``lost`` = confirmed - (executed | dead_lettered): must be 0;
* ``unexpected`` = (executed | dead_lettered) - sent: must be 0;
* ``recovered`` = publish_failed & (executed | dead_lettered): allowed.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "EVENT_KINDS",
    "Checks",
    "Classification",
    "Event",
    "LedgerWriter",
    "classify",
    "percentile",
    "read_ledger",
]

#: Event kinds: publisher ``intent``/``confirmed``/``failed``, task ``start``/``done``,
#: and ``dead`` for every entry read back from a dead-letter queue.
EventKind = Literal["intent", "confirmed", "failed", "start", "done", "dead"]
EVENT_KINDS: frozenset[str] = frozenset({"intent", "confirmed", "failed", "start", "done", "dead"})

#: Ids listed per figure in a classification (the counts are always complete).
SAMPLE_IDS = 20


@dataclass(frozen=True)
class Event:
    """One ledger line.

    Attributes:
        kind: What happened.
        id: The task id.
        t: When, in seconds since the epoch.
        attempt: The message's attempt number (``start``/``done``/``dead``).
        pid: The process that recorded it.
        info: Anything else (``failed``: the exception; ``dead``: reason, headers).
    """

    kind: str
    id: str
    t: float
    attempt: int | None = None
    pid: int | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(
                f"Unknown ledger event kind {self.kind!r}; known: {sorted(EVENT_KINDS)}"
            )
        if not self.id:
            raise ValueError("A ledger event needs a task id.")

    def to_line(self) -> bytes:
        """Return the event as one JSON line."""
        data: dict[str, Any] = {"k": self.kind, "id": self.id, "t": round(self.t, 6)}
        if self.attempt is not None:
            data["a"] = self.attempt
        if self.pid is not None:
            data["pid"] = self.pid
        if self.info:
            data["info"] = dict(self.info)
        return (json.dumps(data, separators=(",", ":"), default=str) + "\n").encode()

    @classmethod
    def from_line(cls, line: str | bytes) -> Event:
        """Parse one JSON line written by :meth:`to_line`.

        Raises:
            ValueError: The line is not a ledger event (torn, or not JSON).
        """
        try:
            data = json.loads(line)
            return cls(
                kind=data["k"],
                id=data["id"],
                t=float(data["t"]),
                attempt=data.get("a"),
                pid=data.get("pid"),
                info=data.get("info") or {},
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"Not a ledger line: {line[:80]!r}") from exc


class LedgerWriter:
    """Appends events to one file, each line written whole and ``fsync``-ed.

    Thread-safe. One writer per process: give each its own path.

    Args:
        path: The file; created if missing, appended to otherwise.
        fsync: Flush every line to disk (the protocol's setting; off only for
            unit tests on slow disks).
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def record(
        self,
        kind: EventKind,
        task_id: str,
        *,
        attempt: int | None = None,
        t: float | None = None,
        **info: Any,
    ) -> None:
        """Append one event (time now unless ``t`` is given)."""
        event = Event(kind, task_id, time.time() if t is None else t, attempt, self._pid, info)
        line = event.to_line()
        with self._lock:
            os.write(self._fd, line)
            if self.fsync:
                os.fsync(self._fd)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_ledger(directory: str | os.PathLike[str]) -> tuple[list[Event], int]:
    """Read every ``*.jsonl`` file under ``directory``.

    Returns:
        The events sorted by time, and how many lines were torn (unparsable),
        which a SIGKILL in the middle of a write can leave at the end of a file.
    """
    events: list[Event] = []
    torn = 0
    for path in sorted(Path(directory).glob("*.jsonl")):
        with path.open("rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    events.append(Event.from_line(raw))
                except ValueError:
                    torn += 1
    events.sort(key=lambda e: e.t)
    return events, torn


def percentile(values: Iterable[float], q: float) -> float | None:
    """Return the ``q``-th percentile (0-100, nearest rank) of ``values``; None if empty."""
    data = sorted(values)
    if not data:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be 0 to 100, not {q!r}")
    rank = max(1, -(-len(data) * q // 100))  # ceil(n * q / 100), at least 1
    return data[int(rank) - 1]


@dataclass
class Classification:
    """The protocol's figures over all ids of one scenario run."""

    sent: int = 0
    confirmed: int = 0
    publish_failed: int = 0
    executed: int = 0
    executed_more_than_once: int = 0
    started_more_than_once: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    dead_duplicates: int = 0
    lost: int = 0
    recovered: int = 0
    unexpected: int = 0
    done_and_dead: int = 0
    starts: int = 0
    dones: int = 0
    e2e_ms: dict[str, float | None] = field(default_factory=dict)
    #: A few ids per non-zero figure that needs a look (lost, unexpected, duplicated).
    samples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def dead_total(self) -> int:
        """Ids in the dead-letter queue, whatever the reason."""
        return sum(self.dead_lettered.values())

    def to_dict(self) -> dict[str, Any]:
        """Return the figures as JSON-able values."""
        return asdict(self)


def classify(events: Iterable[Event]) -> Classification:
    """Classify every id found in ``events`` (see the module docstring).

    ``dead_lettered`` counts ids by their (first) dead-letter reason; an id
    dead-lettered more than once is counted once there and in ``dead_duplicates``.
    ``e2e_ms`` is first ``start`` minus ``intent``, over ids that have both.
    """
    intent: dict[str, float] = {}
    confirmed: set[str] = set()
    failed: set[str] = set()
    starts: Counter[str] = Counter()
    first_start: dict[str, float] = {}
    dones: Counter[str] = Counter()
    dead_reasons: dict[str, list[str]] = defaultdict(list)
    for e in events:
        if e.kind == "intent":
            intent.setdefault(e.id, e.t)
        elif e.kind == "confirmed":
            confirmed.add(e.id)
        elif e.kind == "failed":
            failed.add(e.id)
        elif e.kind == "start":
            starts[e.id] += 1
            if e.id not in first_start or e.t < first_start[e.id]:
                first_start[e.id] = e.t
        elif e.kind == "done":
            dones[e.id] += 1
        elif e.kind == "dead":
            dead_reasons[e.id].append(str(e.info.get("reason") or "unknown"))
    sent = set(intent)
    executed = set(dones)
    dead = set(dead_reasons)
    accounted = executed | dead
    lost = confirmed - accounted
    unexpected = accounted - sent
    dup = {i for i, n in dones.items() if n > 1}
    restarted = {i for i, n in starts.items() if n > 1}
    e2e = [(first_start[i] - intent[i]) * 1000.0 for i in first_start.keys() & intent.keys()]
    c = Classification(
        sent=len(sent),
        confirmed=len(confirmed),
        publish_failed=len(failed),
        executed=len(executed),
        executed_more_than_once=len(dup),
        started_more_than_once=len(restarted),
        dead_lettered=dict(Counter(reasons[0] for reasons in dead_reasons.values())),
        dead_duplicates=sum(1 for r in dead_reasons.values() if len(r) > 1),
        lost=len(lost),
        recovered=len(failed & accounted),
        unexpected=len(unexpected),
        done_and_dead=len(executed & dead),
        starts=sum(starts.values()),
        dones=sum(dones.values()),
        e2e_ms={
            "p50": _round(percentile(e2e, 50)),
            "p99": _round(percentile(e2e, 99)),
            "p99.9": _round(percentile(e2e, 99.9)),
            "mean": _round(statistics.fmean(e2e)) if e2e else None,
        },
    )
    for name, ids in (("lost", lost), ("unexpected", unexpected), ("executed_more_than_once", dup)):
        if ids:
            c.samples[name] = sorted(ids)[:SAMPLE_IDS]
    return c


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class Checks:
    """Pass criteria of one scenario run, and its extra figures."""

    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}

    @property
    def passed(self) -> bool:
        """Whether every criterion recorded so far holds."""
        return all(ch["ok"] for ch in self.checks)

    def check(self, name: str, ok: bool, value: Any = None, want: str = "") -> bool:
        """Record one pass criterion."""
        self.checks.append({"check": name, "ok": bool(ok), "value": value, "want": want})
        return ok

    def standard_checks(
        self,
        c: Classification,
        *,
        dup_bound: int | None = 0,
        dead: int | None = 0,
        publish_failed: int | None = 0,
    ) -> None:
        """lost = 0, unexpected = 0, and the scenario's duplicate / dead / publish bounds."""
        self.check("lost", c.lost == 0, c.lost, "0")
        self.check("unexpected", c.unexpected == 0, c.unexpected, "0")
        if dup_bound is not None:
            self.check(
                "executed_more_than_once",
                c.executed_more_than_once <= dup_bound,
                c.executed_more_than_once,
                f"<= {dup_bound}",
            )
        if dead is not None:
            self.check("dead_lettered", c.dead_total == dead, c.dead_total, str(dead))
        if publish_failed is not None:
            self.check(
                "publish_failed",
                c.publish_failed == publish_failed,
                c.publish_failed,
                str(publish_failed),
            )
