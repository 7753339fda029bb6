"""Poison of every kind for one queue, the good tasks sent between them, and the
criteria the outcome is judged by.

S7 uses it with the harness's worker processes, S15 with a worker in process
on ``memory://``; both record their figures on a :class:`CheckTarget`.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mqtasks import App, EncodeError
from mqtasks.deadletter import HEADER_DEATH_DROPPED_HEADERS
from mqtasks.dlq import list_dead_letters
from mqtasks.exceptions import MQTasksError
from mqtasks.transport import QueueSpec, RedisTransport
from mqtasks.transport.base import dead_letter_spec
from mqtasks.transport.kombu import KombuTransport
from mqtasks.transport.memory import MemoryTransport

from ..ledger import Classification, Event, LedgerWriter
from ..publisher import Publisher
from ..workload import Job
from .injector import PoisonInjector
from .kinds import POISON_KINDS, build_poison, variant_counts

__all__ = ["CheckTarget", "Item", "Planned", "PoisonWorkload", "interleaved", "spaced"]


class CheckTarget(Protocol):
    """Where criteria and figures go: a harness :class:`~reliability.run.Run`
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
            tasks by a :class:`~reliability.publisher.Publisher` in ``publisher-s7.jsonl``.
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
        if not isinstance(transport, RedisTransport | MemoryTransport):
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
    if isinstance(transport, RedisTransport):
        transport.publisher().delete(transport.queue_key(queue))
        return
    if not isinstance(transport, KombuTransport):  # postgresql://: a queue is its rows
        transport.delete([QueueSpec(queue)])
        return
    with transport.connection() as conn:
        conn.default_channel.queue_delete(queue)


def interleaved(poison: Sequence[Planned], good: Sequence[Job], rng: Any) -> list[Item]:
    """Poison and good jobs in a random order."""
    items: list[Item] = [*poison, *good]
    rng.shuffle(items)
    return items


def spaced(poison: Sequence[Planned], good: Sequence[Job]) -> list[Item]:
    """Each poison message followed by an equal share of the good jobs."""
    items: list[Item] = []
    per = len(good) // max(1, len(poison))
    rest = list(good)
    for p in poison:
        items.append(p)
        items += rest[:per]
        rest = rest[per:]
    return items + rest
