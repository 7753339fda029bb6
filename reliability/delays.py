"""Tasks the broker holds back: S10 (expiry shorter than the retry schedule),
S10b (countdowns longer than RabbitMQ's ``consumer_timeout``) and S10c (Redis
countdowns longer than the liveness window).

S10b sets RabbitMQ's ``consumer_timeout`` to its 60 s minimum at run time and
sends tasks whose countdown outlasts it twice over: a delay held unacknowledged
by a worker would get its channel closed with ``PRECONDITION_FAILED``. A raw
consumer that holds one message unacknowledged (:class:`HoldControl`) runs
alongside, to show the broker does enforce the timeout on channels opened after
the change.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any

import kombu

from .brokers import RabbitNode
from .harness import Harness
from .ledger import percentile
from .profiles import BrokerProfile
from .run import Run
from .steps import finish, starts_by_id
from .workload import Job

__all__ = ["HoldControl", "s10", "s10b", "s10c"]

#: The lowest ``consumer_timeout`` RabbitMQ enforces, in ms (it checks once a minute).
CONSUMER_TIMEOUT_MS = 60000


def s10(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Expiry shorter than the retry schedule: DLQ 'expired' after 3 attempts, no late start."""
    with h.run("S10", broker) as run:
        started = time.time()
        n = h.profile.n(100, minimum=10)
        run.pool.start()
        time.sleep(1.5)
        run.publish_all([Job("rel.expiring", (run.new_id(),), {"expires": 10.0}) for _ in range(n)])
        events, c = finish(run, 120)
        run.standard_checks(c, dead=n)
        intents = {e.id: e.t for e in events if e.kind == "intent"}
        starts = starts_by_id(events)
        late = [i for i, ss in starts.items() if max(e.t for e in ss) > intents[i] + 10.0]
        run.check("no_start_after_expiry", not late, len(late), "0")
        counts = sorted({len(v) for v in starts.values()})
        run.check("attempts_per_id", counts == [3], counts, "3 (t = 0, 2, 6 s)")
        reasons = sorted(c.dead_lettered)
        run.check("dead_reason", reasons == ["expired"], reasons, "expired")
        return run.result(c, started=started)


def s10c(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Redis: countdowns longer than the liveness/visibility window run once."""
    countdown = 60.0
    with h.run("S10c", broker) as run:
        started = time.time()
        n = h.profile.n(1000)
        run.pool.start()
        time.sleep(1.5)
        run.publish_all(
            [Job("rel.work", (run.new_id(), 1.0), {"countdown": countdown}) for _ in range(n)]
        )
        events, c = finish(run, countdown + 120)
        run.standard_checks(c)
        intents = {e.id: e.t for e in events if e.kind == "intent"}
        early = [
            i
            for i, ss in starts_by_id(events).items()
            if min(e.t for e in ss) < intents[i] + countdown
        ]
        run.check("not_before_countdown", not early, len(early), "0 started before the countdown")
        return run.result(c, started=started)


def _consumer_timeout(node: RabbitNode) -> int | None:
    """The node's ``consumer_timeout`` in ms; None when it is unset."""
    out = node.ctl("eval", "application:get_env(rabbit, consumer_timeout).", timeout=30)
    m = re.search(r"\{ok,\s*(\d+)\}", out)
    return int(m.group(1)) if m else None


def _restore_consumer_timeout(node: RabbitNode, previous: int | None) -> None:
    if previous is None:
        node.ctl("eval", "application:unset_env(rabbit, consumer_timeout).", timeout=30)
    else:
        node.ctl("eval", f"application:set_env(rabbit, consumer_timeout, {previous}).", timeout=30)


class HoldControl:
    """A raw consumer that takes one message and never acknowledges it.

    With ``consumer_timeout`` in force the broker closes its channel with
    ``PRECONDITION_FAILED`` one to two minutes later: proof that channels opened
    after the change get the new timeout, so the workers' channels have it too.

    Args:
        url: The node's AMQP URL.
        queue: Name of the exclusive queue it declares.
    """

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self.local_port: int | None = None
        self.delivered_at: float | None = None
        self.closed_at: float | None = None
        self.error: str | None = None
        self._conn: kombu.Connection | None = None

    def start(self) -> None:
        """Connect, publish one message to an exclusive queue and take it unacknowledged."""
        conn = self._conn = kombu.Connection(self.url, heartbeat=0, connect_timeout=5)
        conn.connect()
        channel = conn.channel()
        queue = kombu.Queue(
            self.queue,
            exchange=kombu.Exchange(""),
            routing_key=self.queue,
            exclusive=True,
            auto_delete=True,
            durable=False,
        ).bind(channel)
        queue.declare()
        kombu.Producer(channel, auto_declare=False).publish(b"hold", routing_key=self.queue)
        consumer = kombu.Consumer(channel, queues=[queue], no_ack=False, auto_declare=False)

        def on_message(message: Any) -> None:
            self.delivered_at = time.time()

        consumer.on_message = on_message
        consumer.consume()
        deadline = time.monotonic() + 10
        while self.delivered_at is None and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1)
        self.local_port = int(conn.connection.transport.sock.getsockname()[1])

    def wait_closed(self, until: float) -> None:
        """Read the connection until the broker closes the channel or epoch time ``until``."""
        conn = self._conn
        while conn is not None and self.closed_at is None and time.time() < until:
            try:
                conn.drain_events(timeout=min(1.0, max(0.05, until - time.time())))
            except TimeoutError:
                continue
            except Exception as exc:
                self.closed_at = time.time()
                self.error = f"{type(exc).__name__}: {exc}"[:300]

    def close(self) -> None:
        """Close the connection (the exclusive queue goes with it)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()

    def figures(self) -> dict[str, Any]:
        """What the control saw."""
        after = (
            round(self.closed_at - self.delivered_at, 1)
            if self.closed_at is not None and self.delivered_at is not None
            else None
        )
        return {
            "delivered": self.delivered_at is not None,
            "closed_after_s": after,
            "error": self.error,
        }


def _broker_log_offset(node: RabbitNode) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in (node.base / "log").glob("*.log")}


def _consumer_timeouts_in_broker_log(
    node: RabbitNode, since: dict[str, int]
) -> list[tuple[int | None, str]]:
    """Channels the broker closed for ``consumer_timeout`` since the log offsets
    ``since``: the client's local port (None: not found) and the log line."""
    found: list[tuple[int | None, str]] = []
    for path in (node.base / "log").glob("*.log"):
        with path.open("rb") as f:
            f.seek(since.get(str(path), 0))
            text = f.read().decode(errors="replace")
        for m in re.finditer(r"delivery acknowledgement on channel \d+ timed out", text):
            before = text[max(0, m.start() - 1000) : m.start()]
            ports = re.findall(r"\(127\.0\.0\.1:(\d+) ->", before)
            line = text[text.rfind("\n", 0, m.start()) + 1 : m.end()]
            found.append((int(ports[-1]) if ports else None, line[-200:]))
    return found


def s10b(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Countdowns longer than ``consumer_timeout`` (60 s): no channel closed, each runs once, on time."""
    release = h.profile.name == "release"
    # Above 2 x consumer_timeout: the broker checks once a minute.
    countdown = 180.0 if release else 130.0
    with h.run("S10b", broker) as run:
        started = time.time()
        n = h.profile.n(1000)
        node = h.rabbit_node()
        log_offset = _broker_log_offset(node)
        previous = _consumer_timeout(node)
        run.extra["consumer_timeout_before_ms"] = previous
        control = HoldControl(run.url, run.queue + ".hold")
        try:
            node.ctl(
                "eval",
                f"application:set_env(rabbit, consumer_timeout, {CONSUMER_TIMEOUT_MS}).",
                timeout=30,
            )
            now = _consumer_timeout(node)
            run.extra["consumer_timeout_ms"] = now
            run.check(
                "consumer_timeout_set", now == CONSUMER_TIMEOUT_MS, now, f"{CONSUMER_TIMEOUT_MS} ms"
            )
            control.start()
            run.pool.start()
            time.sleep(1.5)
            run.extra["countdown_s"] = countdown
            jobs = [run.new_id() for _ in range(n)]
            run.publish_all([Job("rel.work", (i, 1.0), {"countdown": countdown}) for i in jobs])
            last_intent = time.time()
            # Nothing is due before the countdown: read only the control meanwhile.
            control.wait_closed(last_intent + countdown - 2)
            _wait_done(run, set(jobs), deadline=last_intent + countdown + 120)
            events, c = finish(run, 120, quiet=2.0)
        finally:
            control.close()
            _restore_consumer_timeout(node, previous)
        run.extra["consumer_timeout_restored_ms"] = _consumer_timeout(node)
        run.standard_checks(c)
        run.check("executed_all", c.executed == n, c.executed, str(n))
        run.check(
            "started_more_than_once", c.started_more_than_once == 0, c.started_more_than_once, "0"
        )
        intents = {e.id: e.t for e in events if e.kind == "intent"}
        starts = starts_by_id(events)
        late = [min(e.t for e in ss) - intents[i] for i, ss in starts.items() if i in intents]
        early = [x for x in late if x < countdown]
        run.extra["start_after_intent_s"] = {
            "min": round(min(late), 3) if late else None,
            "p50": round(percentile(late, 50) or 0, 3) if late else None,
            "max": round(max(late), 3) if late else None,
        }
        run.check(
            "not_before_countdown",
            not early,
            len(early),
            f"0 started < {countdown:.0f} s after intent",
        )
        worker_closed = run.log_count("PRECONDITION_FAILED") + run.log_count("PreconditionFailed")
        run.check("no_precondition_failed_in_worker_logs", worker_closed == 0, worker_closed, "0")
        closed = _consumer_timeouts_in_broker_log(node, log_offset)
        wait_log = time.monotonic() + 10  # the broker writes its log asynchronously
        while control.error is not None and time.monotonic() < wait_log:
            if any(p == control.local_port for p, _ in closed):
                break
            time.sleep(0.5)
            closed = _consumer_timeouts_in_broker_log(node, log_offset)
        others = [p for p, _ in closed if p is None or p != control.local_port]
        control_logged = any(p == control.local_port for p, _ in closed)
        run.extra["broker_log_consumer_timeouts"] = [
            {"port": p, "control": p == control.local_port, "line": line} for p, line in closed
        ]
        run.check(
            "no_consumer_timeout_in_broker_log",
            not others and control_logged,
            {"workers": len(others), "control_logged": control_logged},
            "0 channels closed for consumer_timeout besides the control's (found in the log)",
        )
        run.extra["control"] = control.figures()
        run.check(
            "control_channel_closed",
            control.error is not None and "PRECONDITION_FAILED" in control.error,
            control.figures(),
            "the unacking control consumer is closed with PRECONDITION_FAILED",
        )
        lost_events = run.log_events(("broker.connection_lost", "broker.heartbeat_missed"))
        run.extra["worker_connection_lost_events"] = len(lost_events)
        return run.result(c, started=started)


def _wait_done(run: Run, ids: set[str], deadline: float) -> None:
    """Poll the ledger until every id in ``ids`` has a ``done`` (or epoch time ``deadline``)."""
    while time.time() < deadline:
        done = {e.id for e in run.events() if e.kind == "done"}
        if ids <= done:
            return
        time.sleep(0.5)
