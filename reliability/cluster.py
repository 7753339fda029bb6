"""S23: a 3-node RabbitMQ cluster under load loses a node, in three ways.

The workers and the publishers hold the failover list of the three nodes.
While 4 publisher threads send W-mix tasks to 2 worker processes, the node
leading the work queue is killed (``kill -9``) and started again; each node
is stopped gracefully and started again in turn (a rolling upgrade); then
one node is cut off by pausing its Erlang VM (SIGSTOP: its clients and the
other nodes hear nothing from it) and resumed. KQ (quorum queues replicated
on the 3 nodes) must lose nothing; KC (classic queues, each on one node) is
the negative control, whose losses and outages are reported.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .ledger import Classification, Event, classify
from .load import _start_publishers
from .profiles import BrokerProfile
from .steps import sleep_until, wmix_timeout

if TYPE_CHECKING:
    from .harness import Harness
    from .rabbit_cluster import RabbitCluster
    from .run import Run

__all__ = ["s23"]

#: A pause in ``done`` events longer than this counts as an outage.
_STALL_S = 1.0


def s23(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Cluster faults under load: kill -9 of the queue's leader, a rolling restart,
    a paused node; lost = 0 on quorum queues, losses reported on classic ones."""
    release = h.profile.name == "release"
    cluster: RabbitCluster = h.group(broker)  # type: ignore[assignment]
    quorum = broker == "KQ"
    options = {"replicas": len(cluster.nodes)} if quorum else {}
    settle = 10.0 if release else 5.0  # seconds of steady traffic between faults
    paused_s = 30.0  # below the distribution's tick (45-75 s): no net split, no mnesia repair
    with h.run("S23", broker, queue_options=options) as run:
        started = time.time()
        n = h.profile.n(10000)
        # Faults: kill + restart (~20 s), 3 graceful restarts (~15 s each), a pause.
        span = 5 + 25 + 3 * 20 + paused_s + 4 * settle + 20
        rate = n / span
        run.extra["publish_rate"] = round(rate, 1)
        run.extra["nodes"] = [node.name for node in cluster.nodes]
        run.pool.start()
        time.sleep(1.5)
        run.app.declare([run.queue])
        run.extra["replicas"] = len(cluster.members(run.queue))
        publishers = _start_publishers(run, run.wmix_jobs(n), rate, "s23")
        sleep_until(run, 5.0)
        # 1. kill -9 of the node that leads the queue (holds it, for a classic queue).
        home = cluster.queue_home(run.queue) or cluster.nodes[0]
        run.fault(f"kill -9 {home.name} (queue leader)", at=time.time())
        cluster.kill(home)
        time.sleep(settle)
        _back(run, cluster.restart(home))
        # 2. Rolling upgrade: each node stopped gracefully and started again in turn.
        for node in cluster.nodes:
            time.sleep(settle)
            run.fault(f"graceful stop+start {node.name}", at=time.time())
            cluster.graceful_stop(node)
            time.sleep(3)
            _back(run, cluster.restart(node))
        # 3. The node leading the queue now cut off: paused, then resumed.
        time.sleep(settle)
        home = cluster.queue_home(run.queue) or cluster.nodes[0]
        run.fault(f"pause {home.name} {paused_s:.0f} s (queue leader)", at=time.time())
        cluster.pause(home)
        time.sleep(paused_s)
        cluster.resume(home)
        _back(run, 0.0)
        for p in publishers:
            p.join()
        events, c = _finish(run, wmix_timeout(run, n, 120))
        run.extra["publishers"] = [p.stats.summary() for p in publishers]
        _recovery(run, events)
        _checks(run, c, events, quorum, publishers)
        return run.result(c, started=started)


def _back(run: Run, restart_s: float) -> None:
    """Note that the last fault's node is back (after ``restart_s`` seconds of start-up)."""
    f = run.faults[-1]
    f["restart_s"] = round(restart_s, 1)
    f["back_at"] = time.time()
    f["outage_s"] = round(f["back_at"] - f["at"], 1)


def _finish(run: Run, timeout: float) -> tuple[list[Event], Classification]:
    """Wait for quiescence on the cluster, read the dead letters, classify every id."""
    ok = run.wait_quiescent(timeout)  # depths as a running node of the cluster tells them
    run.check("quiescent", ok, ok, f"within {timeout:.0f} s")
    run.extra["dlq_entries"] = run.drain_dead_letters()
    events = run.events()
    return events, classify(events)


def _gaps(times: Sequence[float], start: float, end: float) -> tuple[float, float] | None:
    """The longest gap between consecutive ``times`` that begins within [start, end]
    (while the fault lasts, its node's return included), as (from, to)."""
    inside = sorted(t for t in times if start - 5.0 <= t <= end + 120.0)
    best: tuple[float, float] | None = None
    for a, b in itertools.pairwise(inside):
        if b < start or a > end:
            continue
        if best is None or b - a > best[1] - best[0]:
            best = (a, b)
    return best


def _recovery(run: Run, events: Sequence[Event]) -> None:
    """Per fault: how long tasks stopped completing (and confirms stopped coming), and
    ``recovery_s``, the seconds from the fault until tasks completed again after that pause."""
    done = [e.t for e in events if e.kind == "done"]
    confirmed = [e.t for e in events if e.kind == "confirmed"]
    for f in run.faults:
        at, back = f["at"], f["back_at"]
        for name, times in (("", done), ("publisher_", confirmed)):
            gap = _gaps(times, at, back)
            if gap is None:
                f[f"{name}recovery_s"] = None
                continue
            stall = gap[1] - gap[0]
            f[f"{name}stall_s"] = round(stall, 3)
            after = gap[1] if stall > _STALL_S else min((t for t in times if t >= at), default=None)
            f[f"{name}recovery_s"] = None if after is None else round(max(0.0, after - at), 3)


def _lost_by_fault(run: Run, events: Sequence[Event]) -> dict[str, int]:
    """Lost ids (confirmed, neither done nor dead-lettered) by the last fault that
    began before they were confirmed."""
    confirmed = {e.id: e.t for e in events if e.kind == "confirmed"}
    finished = {e.id for e in events if e.kind in ("done", "dead")}
    out: dict[str, int] = {}
    for task_id, t in confirmed.items():
        if task_id in finished:
            continue
        before = [f["kind"] for f in run.faults if f["at"] <= t]
        key = before[-1] if before else "before the faults"
        out[key] = out.get(key, 0) + 1
    return out


def _checks(
    run: Run, c: Classification, events: Sequence[Event], quorum: bool, publishers: Sequence[Any]
) -> None:
    faults = len(run.faults)
    reasons = [e for e in events if e.kind == "dead" and not e.info.get("reason")]
    run.check("dead_letters_have_a_reason", not reasons, len(reasons), "0 without a reason")
    rec = [f.get("recovery_s") for f in run.faults]
    run.extra["lost_by_fault"] = _lost_by_fault(run, events)
    if quorum:
        run.standard_checks(
            c,
            dup_bound=run.bound(faults, processes_hit=run.workers),
            dead=None,
            publish_failed=None,
        )
        run.check(
            "tasks_resume_after_each_fault",
            all(r is not None for r in rec),
            rec,
            "tasks complete again after every fault",
        )
        worst = max((max(p.stats.latencies, default=0.0) for p in publishers), default=0.0)
        run.check(
            "delay_bounded", worst <= 10.0 + 1.0, round(worst, 2), "<= publish_timeout (10 s) + 1 s"
        )
        return
    # KC, the negative control: classic queues live on one node. The faults must
    # show it (losses, failed publishes or an outage while the queue's node is
    # down), or they did not land.
    run.extra["lost_reported"] = c.lost
    stall = run.faults[0].get("stall_s") or 0.0
    shown = c.lost > 0 or c.publish_failed > 0 or stall >= 5.0
    run.check(
        "classic_queues_disrupted",
        shown,
        {"lost": c.lost, "publish_failed": c.publish_failed, "kill_stall_s": stall},
        "lost > 0, publish_failed > 0 or a stall >= 5 s when the queue's node is killed",
    )
    run.check("unexpected", c.unexpected == 0, c.unexpected, "0")
