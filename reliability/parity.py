"""S15: ``memory://`` parity, in process.

The scenarios S0 (baseline), S7 (poison) and S8 (always-failing task) run on
the memory transport with a worker in this process, and are judged by the same
criteria as on the real brokers (:func:`~reliability.retries.s8_checks`,
:meth:`~reliability.poison.workload.PoisonWorkload.judge`). It shows that what
a unit test on ``memory://`` sees is what production sees for these behaviours.
It does not cover crashes, restarts or redelivery: the memory transport keeps
nothing across a process and does not hand back a dead consumer's messages.
"""

from __future__ import annotations

import random
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mqtasks import App
from mqtasks.testing import running_worker
from mqtasks.transport.base import dead_letter_spec

from .harness import Harness
from .ledger import Checks, Event, LedgerWriter, classify, read_ledger
from .poison.kinds import CLASS_MODULES
from .poison.workload import PoisonWorkload, interleaved
from .profiles import BrokerProfile
from .publisher import Publisher
from .retries import s8_checks
from .run import record_dead_letters
from .tasks import build_app
from .workload import Job, wmix_ms

__all__ = ["s15"]

#: Figures of the three parts added up in the row.
SUMMED = (
    "sent",
    "confirmed",
    "publish_failed",
    "executed",
    "executed_more_than_once",
    "started_more_than_once",
    "lost",
    "unexpected",
)


class MemoryRun(Checks):
    """One in-process run on ``memory://``: an app, its ledger and a threaded worker."""

    def __init__(self, name: str, base: Path) -> None:
        super().__init__()
        tag = secrets.token_hex(3)
        self.queue = f"rel.{name.lower()}.mem.{tag}"
        self.ledger_dir = base / f"{name}-MEM-{tag}" / "ledger"
        self.ledger_dir.mkdir(parents=True)
        self.app: App = build_app(
            {
                "MQTASKS_BROKER_URL": "memory://",
                "RELIABILITY_QUEUE": self.queue,
                "RELIABILITY_LEDGER_DIR": str(self.ledger_dir),
            }
        )
        self.ledger = LedgerWriter(self.ledger_dir / "harness.jsonl")
        self._n = 0

    def new_id(self, prefix: str) -> str:
        """A fresh task id."""
        self._n += 1
        return f"{prefix}-{self._n:06d}-{secrets.token_hex(4)}"

    def publish(self, jobs: list[Job]) -> Publisher:
        """Publish ``jobs`` now, recording intent and confirmed."""
        p = Publisher(self.app, LedgerWriter(self.ledger_dir / "publisher.jsonl"), None)
        p.start(jobs)
        p.join()
        return p

    def wait_drained(self, timeout: float, quiet: float = 1.0) -> bool:
        """Wait until nothing is ready or delayed and the ledger stayed still ``quiet`` s."""
        spec = [self.app.queue(self.queue)]
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            t = self.app.transport
            busy = sum(t.message_counts(spec).values()) + sum(t.delayed_counts(spec).values())
            size = sum(p.stat().st_size for p in self.ledger_dir.glob("*.jsonl"))
            if busy or size != last:
                last, since = size, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return True
            time.sleep(0.1)
        return False


def s15(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """S0, S7 and S8 on ``memory://`` in process, with the real brokers' criteria."""
    started = time.time()
    base = Path(tempfile.mkdtemp(prefix="S15-", dir=h.workdir))
    parts: dict[str, Any] = {}
    all_checks: list[dict[str, Any]] = []
    totals: dict[str, Any] = {}

    def part(name: str, run: MemoryRun, n: int) -> None:
        if name != "S7":  # S7's part records its dead letters under the poison ids itself
            record_dead_letters(run.app, run.queue, run.ledger)
        events, _ = read_ledger(run.ledger_dir)
        c = classify(events)
        if name == "S0":
            run.standard_checks(c)
            run.check("executed_all", c.executed == n, c.executed, str(n))
        elif name == "S8":
            s8_checks(run, events, c, n, run.queue)
        for ch in run.checks:
            all_checks.append({**ch, "check": f"{name}.{ch['check']}"})
        parts[name] = {
            "sent": c.sent,
            "executed": c.executed,
            "dead_lettered": c.dead_lettered,
            "lost": c.lost,
            "passed": run.passed,
            **run.extra,
        }
        for key in SUMMED:
            totals[key] = totals.get(key, 0) + getattr(c, key)
        dead = totals.setdefault("dead_lettered", {})
        for reason, count in c.dead_lettered.items():
            dead[reason] = dead.get(reason, 0) + count

    # S0: W-mix, two worker threads (the real brokers' two single-threaded workers).
    run = MemoryRun("S0", base)
    n = h.profile.n(10000)
    with running_worker(run.app, concurrency=2, prefetch=8, collect_errors=False):
        rng = random.Random(f"{h.seed}-S15")
        run.publish([Job("rel.work", (run.new_id("S15-S0"), wmix_ms(rng))) for _ in range(n)])
        ok = run.wait_drained(max(60.0, n * 0.04))
        run.check("quiescent", ok, ok)
    part("S0", run, n)
    run.app.close()

    # S8: always fails, 3 retries on the 0.2, 0.4, 0.8 s schedule, then the DLQ.
    run = MemoryRun("S8", base)
    n = h.profile.n(100, minimum=10)
    with running_worker(run.app, concurrency=2, prefetch=8, collect_errors=False):
        run.publish([Job("rel.fail", (run.new_id("S15-S8"),)) for _ in range(n)])
        ok = run.wait_drained(30.0)
        run.check("quiescent", ok, ok)
    part("S8", run, n)
    run.app.close()

    # S7: every poison kind, injected bypassing the producer.
    run = MemoryRun("S7", base)
    with running_worker(run.app, concurrency=2, prefetch=8, collect_errors=False):
        _poison_part(h, run)
        ok = run.wait_drained(60.0)
        run.check("quiescent", ok, ok)
    part("S7", run, 0)
    run.app.close()

    return {
        "scenario": "S15",
        "broker": broker,
        "profile": h.profile.name,
        **totals,
        "checks": all_checks,
        "passed": all(ch["ok"] for ch in all_checks),
        "duration_s": round(time.time() - started, 1),
        "parts": parts,
        "notes": [
            "memory:// in process: no crashes, restarts or redelivery are covered "
            "(the memory transport keeps nothing across processes)."
        ],
    }


def _poison_part(h: Harness, run: MemoryRun) -> None:
    """S7 in process on ``memory://`` (for S15), with a worker of ``run.app`` running.

    Injects every kind among good tasks, waits until the worker has settled
    them (60 s at most), records the dead letters in ``run.ledger`` (under the
    poison ids: the caller must not record them again) and checks S7's criteria
    on ``run``. Worker memory, logs and crashes are not judged here: the worker
    is this process.
    """
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
        workload.send(interleaved(workload.plan, jobs, rng))
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
    events, _ = read_ledger(ledger_dir)
    return events
