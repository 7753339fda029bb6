"""S24: Redis behind Sentinel loses no acknowledged task over a failover when
``delay()`` waits for a replica (SR, ``durability="replicated"``); without it
(SP, the negative control) the loss is reported.

Two faults hit the primary under a steady publish: SIGKILL (the Sentinels
promote the replica; the killed node comes back as a replica, so that ``WAIT 1``
can succeed again), then a freeze (SIGSTOP) that outlasts the failover but not
the publish timeout, so that calls blocked on the frozen primary complete on it
after SIGCONT, before the Sentinels demote it: the split-brain window in which a
write acknowledged by the old primary alone is dropped by its resync.
"""

from __future__ import annotations

import time
from typing import Any

from .harness import Harness
from .ledger import Event, classify
from .profiles import BrokerProfile
from .redis_sentinel import SentinelGroup
from .run import Run
from .steps import sleep_until, wmix_timeout

__all__ = ["s24"]

#: Seconds the primary stays frozen: longer than a failover (down-after 2 s plus
#: the election), shorter than the publish timeout (10 s).
FREEZE_S = 8.0


def _depths(run: Run, group: SentinelGroup) -> dict[str, int]:
    """Messages not yet finished, by place, read on the current primary."""
    client = group.client()
    try:
        p = run.key_prefix
        return {
            "ready": client.llen(f"{p}:q:{run.queue}"),
            "delayed": client.zcard(f"{p}:delayed:{run.queue}"),
            "dead": client.llen(f"{p}:q:{run.queue}.dlq"),
            "unacked": sum(client.llen(k) for k in client.scan_iter(match=f"{p}:proc:*")),
        }
    finally:
        client.close()


def _wait_quiescent(run: Run, group: SentinelGroup, timeout: float) -> bool:
    """:meth:`Run.wait_quiescent` with the depths read on the group's current primary."""
    deadline = time.monotonic() + timeout
    last: tuple[int, int] | None = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        if run.publisher is not None and run.publisher.alive:
            time.sleep(1.0)
            continue
        try:
            d = _depths(run, group)
        except Exception as exc:  # a failover may be under way
            run.notes.append(f"depth check failed: {type(exc).__name__}")
            time.sleep(1.0)
            continue
        state = (run.ledger_size(), d["dead"])
        if d["ready"] or d["delayed"] or d["unacked"] or state != last:
            last = state
            since = time.monotonic()
        elif time.monotonic() - since >= run.profile.quiet_s:
            return True
        time.sleep(0.5)
    run.notes.append(f"not quiescent after {timeout:.0f} s")
    return False


def _delete_keys(run: Run, group: SentinelGroup) -> None:
    client = group.client()
    try:
        keys = list(client.scan_iter(match=f"{run.key_prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _publisher_durability(run: Run, broker: BrokerProfile) -> str:
    """Make the harness's own publisher honour the profile's durability; return it.

    The publishing app is built in this process from the run's variables, not
    from the environment its workers get, so MQTASKS_DURABILITY reaches only the
    workers; the scenario sets it on the publisher's transport to match.
    """
    want = "replicated" if broker == "SR" else "local"
    transport = run.app.transport
    if getattr(transport, "durability", "local") != want:
        transport.durability = want  # type: ignore[attr-defined]
        run.notes.append(f"publisher transport set to durability={want!r} by the scenario")
    return want


def _fault_figures(run: Run, events: list[Event]) -> None:
    for f in run.faults:
        f["recovery_s"] = run.first_done_after(events, f["back_at"])
        confirms = [e.t for e in events if e.kind == "confirmed" and e.t >= f["at"]]
        f["first_confirm_after_s"] = round(min(confirms) - f["at"], 3) if confirms else None
        failed = [e for e in events if e.kind == "failed" and f["at"] <= e.t <= f["back_at"]]
        f["publish_failed_in_fault"] = len(failed)


def s24(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Sentinel failover under load: SIGKILL of the primary, then a freeze of it."""
    group = h.group(broker)
    assert isinstance(group, SentinelGroup)
    release = h.profile.name == "release"
    first, gap = (10.0, 40.0) if release else (5.0, 25.0)
    with h.run("S24", broker) as run:
        started = time.time()
        run.extra["durability"] = _publisher_durability(run, broker)
        run.extra["down_after_ms"] = group.down_after_ms
        n = h.profile.n(10000)
        rate = min(200.0, n / (first + gap + FREEZE_S + 30))
        run.extra["publish_rate"] = round(rate, 1)
        run.pool.start()
        time.sleep(1.5)
        run.start_publisher(run.wmix_jobs(n), rate=rate)

        # Given a steady publish, when the primary is killed
        sleep_until(run, first)
        old = group.primary()
        f = run.fault("SIGKILL primary", at=time.time(), port=old.port)
        old.kill()
        took = group.wait_failover(old.port, 60)
        f["failover_s"] = None if took is None else round(took, 2)
        f["rejoin_s"] = round(group.restart(old), 2)  # back as a replica of the new primary
        f["back_at"] = time.time()

        # and later frozen past the failover, then thawed within the publish timeout
        sleep_until(run, max(first + gap, time.time() - run.t0 + 5))
        frozen = group.primary()
        f = run.fault("SIGSTOP primary", at=time.time(), port=frozen.port, seconds=FREEZE_S)
        frozen.freeze()
        try:
            took = group.wait_failover(frozen.port, FREEZE_S)
            f["failover_s"] = None if took is None else round(took, 2)
            time.sleep(max(0.0, f["at"] + FREEZE_S - time.time()))
        finally:
            frozen.thaw()
        f["thawed_at"] = time.time()
        synced = group.wait_synced(60)
        f["resync_s"] = None if synced is None else round(synced, 2)
        f["back_at"] = time.time()

        ok = _wait_quiescent(run, group, wmix_timeout(run, n, 120))
        run.check("quiescent", ok, ok, "within the timeout")
        run.extra["dlq_entries"] = run.drain_dead_letters()
        events = run.events()
        c = classify(events)
        _fault_figures(run, events)
        failovers = [x.get("failover_s") for x in run.faults]
        run.extra["failover_s"] = failovers
        limit = group.down_after_ms / 1000 + 10
        run.check(
            "failover_s",
            all(x is not None and x <= limit for x in failovers),
            failovers,
            f"<= down-after ({group.down_after_ms / 1000:g} s) + 10 s, each fault",
        )
        if broker == "SR":
            run.standard_checks(
                c, dup_bound=run.bound(2, processes_hit=run.workers), publish_failed=None
            )
        else:
            # The negative control: acknowledged writes a failover dropped are reported.
            run.extra["lost_reported"] = c.lost
            run.check("unexpected", c.unexpected == 0, c.unexpected, "0")
        worst = max(run.publisher.stats.latencies, default=0.0) if run.publisher else 0.0
        run.extra["max_delay_s"] = round(worst, 2)
        run.check(
            "delay_bounded", worst <= 11.0, round(worst, 2), "<= publish_timeout (10 s) + 1 s"
        )
        rec = [x.get("recovery_s") for x in run.faults]
        run.check(
            "worker_resumes_s",
            all(r is not None and r <= 15 for r in rec),
            rec,
            "<= 15 s after each fault ends",
        )
        _delete_keys(run, group)
        return run.result(c, started=started)
