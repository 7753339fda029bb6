"""Scenarios S10b (countdowns longer than ``consumer_timeout``) and S11 (slow
consumer, bounded queue) of the fault-injection protocol.

S10b sets RabbitMQ's ``consumer_timeout`` to its 60 s minimum at run time and
sends tasks whose countdown outlasts it twice over: a delay held unacknowledged
by a worker would get its channel closed with ``PRECONDITION_FAILED``. A raw
consumer that holds one message unacknowledged runs alongside, to show the
broker does enforce the timeout on channels opened after the change.

S11 publishes at 500/s into a work queue bounded to ``max_length`` while one
worker takes about 100/s: (a) ``overflow: reject-publish`` must make ``delay()``
raise on every nack; (b) a disk alarm must make ``delay()`` raise within its
timeout and publishing resume once it clears; (c) ``drop-head`` must dead-letter
the dropped messages with reason ``maxlen``. Redis has no queue bound: the row
reports the refusal of ``max_length`` and checks that ``delay()`` raises Redis'
OOM error once ``maxmemory`` is reached under ``noeviction``.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import kombu

from mqtasks.exceptions import ConfigurationError

from .brokers import RabbitNode
from .harness import BrokerProfile, Harness, Job, Run
from .ledger import Classification, Event, LedgerWriter, classify, percentile
from .tasks import build_app

__all__ = ["DepthSampler", "HoldControl", "PacedPublisher", "s10b", "s11"]

#: The lowest ``consumer_timeout`` RabbitMQ enforces, in ms (it checks once a minute).
CONSUMER_TIMEOUT_MS = 60000
#: Publish rate of S11, calls per second.
S11_RATE = 500.0
#: Duration of a ``rel.work`` task in S11, ms (one worker then takes about 100/s).
S11_TASK_MS = 10.0
#: Quiet seconds that end an S11 run once its queues are empty: the publisher has
#: stopped and every call has its answer, so only dead-lettering can be in transit
#: (a dead letter read too late would show as lost, never hide a loss).
S11_QUIET_S = 1.0


# -- shared helpers ------------------------------------------------------------------


def _finish(
    run: Run, timeout: float, quiet: float | None = None
) -> tuple[list[Event], Classification]:
    """Wait for quiescence (a check), read the dead letters, classify every id."""
    ok = run.wait_quiescent(timeout, quiet=quiet)
    run.check("quiescent", ok, ok, f"within {timeout:.0f} s")
    run.extra["dlq_entries"] = run.drain_dead_letters()
    events = run.events()
    return events, classify(events)


def _starts_by_id(events: Sequence[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for e in events:
        if e.kind == "start":
            out.setdefault(e.id, []).append(e)
    return out


def _figures(c: Classification) -> dict[str, Any]:
    """The classification without its samples (for a variant's sub-result)."""
    return {k: v for k, v in c.to_dict().items() if k != "samples"}


def _publish_timeout(run: Run) -> float:
    return float(run.env["MQTASKS_PUBLISH_TIMEOUT"])


@dataclass(frozen=True)
class Call:
    """One ``delay()`` call as the publisher saw it."""

    id: str
    #: When it started (epoch seconds).
    t: float
    #: Seconds until it returned or raised.
    took: float
    #: The exception's type name, or None if the broker confirmed.
    error: str | None = None
    #: The start of the exception's message.
    detail: str | None = None

    @property
    def end(self) -> float:
        """When it returned or raised (epoch seconds)."""
        return self.t + self.took


class PacedPublisher:
    """Calls ``delay()`` of ``rel.work`` from a thread at most ``rate`` times a
    second for ``seconds``, recording every call in the ledger and in :attr:`calls`.

    Unlike :class:`~reliability.harness.Publisher` it never catches up after a
    slow call (a blocked broker would otherwise be followed by a burst), and it
    keeps each exception's message: the scenarios check what ``delay()`` raised.

    Args:
        run: The run (its app, ledger directory and seed).
        phase: Names the ledger file; task ids start with ``<scenario><phase>-``.
        rate: Most calls per second.
        seconds: How long to publish.
        ms: The ``rel.work`` duration of every task.
    """

    def __init__(self, run: Run, phase: str, rate: float, seconds: float, ms: float) -> None:
        self.run = run
        self.phase = phase
        self.rate = rate
        self.seconds = seconds
        self.ms = ms
        self.prefix = f"{run.scenario}{phase}"
        self.ledger = LedgerWriter(run.ledger_dir / f"publisher-{phase}.jsonl")
        self.rng = random.Random(run.rng.getrandbits(64))
        self.calls: list[Call] = []
        self.stop_event = threading.Event()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._thread = threading.Thread(target=self._loop, name=f"publisher-{phase}", daemon=True)

    def start(self) -> None:
        """Start publishing in the background."""
        self.started_at = time.time()
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; return whether it has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """Whether it is still publishing."""
        return self._thread.is_alive()

    def _loop(self) -> None:
        try:
            end = time.monotonic() + self.seconds
            due = time.monotonic()
            while not self.stop_event.is_set():
                now = time.monotonic()
                if now >= end:
                    break
                if due > now:
                    self.stop_event.wait(due - now)
                    continue
                self.publish_one()
                # No catching up: at most 50 ms of calls behind schedule are made up.
                due = max(due + 1 / self.rate, time.monotonic() - 0.05)
        finally:
            self.finished_at = time.time()
            self.ledger.close()

    def publish_one(self) -> Call:
        """Make one ``delay()`` call now and record it."""
        task_id = f"{self.prefix}-{self.rng.getrandbits(64):016x}"
        task = self.run.app.tasks["rel.work"]
        self.ledger.record("intent", task_id)
        t = time.time()
        start = time.monotonic()
        try:
            task.apply_async((task_id, self.ms), task_id=task_id)
        except Exception as exc:  # any type: what delay() raises is a figure here
            took = time.monotonic() - start
            detail = str(exc)[:300]
            self.ledger.record(
                "failed", task_id, error=type(exc).__name__, took=round(took, 3), detail=detail
            )
            call = Call(task_id, t, took, type(exc).__name__, detail)
        else:
            took = time.monotonic() - start
            self.ledger.record("confirmed", task_id)
            call = Call(task_id, t, took)
        self.calls.append(call)
        return call

    def summary(self) -> dict[str, Any]:
        """Calls, achieved rate, latencies and errors by type."""
        took = [c.took for c in self.calls]
        span = (self.finished_at or time.time()) - (self.started_at or time.time())
        return {
            "calls": len(self.calls),
            "confirmed": sum(1 for c in self.calls if c.error is None),
            "errors": dict(Counter(c.error for c in self.calls if c.error is not None)),
            "achieved_per_s": round(len(self.calls) / span, 1) if span > 0 else None,
            "latency_ms_p50": _ms(percentile(took, 50)),
            "latency_ms_p99": _ms(percentile(took, 99)),
            "latency_ms_max": _ms(max(took, default=None)),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# -- S10b ------------------------------------------------------------------------------


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
            events, c = _finish(run, 120, quiet=2.0)
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
        starts = _starts_by_id(events)
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


# -- S11 -------------------------------------------------------------------------------

#: Where S11 runs its variants: (a) on every RabbitMQ row, (b) once (a node-wide
#: alarm blocks publishing connections whatever the queue type), (c) on classic queues.
ALARM_BROKERS: tuple[BrokerProfile, ...] = ("RQ",)
DROP_HEAD_BROKERS: tuple[BrokerProfile, ...] = ("RC",)


class DepthSampler:
    """Samples the ready count of a RabbitMQ queue about once a second, from a thread.

    Uses a connection of its own that never publishes, so a resource alarm
    does not block it.

    Args:
        url: The node's AMQP URL.
        queue: The queue to watch.
    """

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="depth-sampler", daemon=True)
        self._mark = 0

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        self._thread.join(10)

    def take(self) -> int | None:
        """Highest ready count sampled since the previous call (None: no sample)."""
        new = [d for _, d in self.samples[self._mark :]]
        self._mark = len(self.samples)
        return max(new) if new else None

    def _loop(self) -> None:
        conn: kombu.Connection | None = None
        while not self._stop.wait(1.0):
            try:
                if conn is None:
                    conn = kombu.Connection(self.url, heartbeat=0, connect_timeout=5)
                    conn.connect()
                ok = conn.default_channel.queue_declare(queue=self.queue, passive=True)
                self.samples.append((time.time(), int(ok.message_count)))
            except Exception:  # a closed channel, the broker restarting: sample again later
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.collect()
                conn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()


def _disk_free_limit(node: RabbitNode) -> str:
    """The node's disk free limit as ``set_disk_free_limit`` takes it (bytes)."""
    out = node.ctl("eval", "rabbit_disk_monitor:get_disk_free_limit().", timeout=30).strip()
    return out if out.isdigit() else "50MB"


def _alarms(node: RabbitNode) -> str:
    return node.ctl("eval", "rabbit_alarm:get_alarms().", timeout=30).strip()


def _set_disk_free_limit(node: RabbitNode, limit: str) -> None:
    """``rabbitmqctl set_disk_free_limit``, tried three times (a stuck alarm
    would block every later scenario)."""
    for attempt in range(3):
        try:
            node.ctl("set_disk_free_limit", limit, timeout=30)
            return
        except Exception:
            if attempt == 2:
                raise
            time.sleep(1.0)


def _publish_counters(node: RabbitNode) -> dict[str, int]:
    """The node's AMQP 0-9-1 publishing counters (``messages_received_confirm_total``,
    ``messages_confirmed_total``...); empty if they cannot be read."""
    out = node.ctl(
        "eval",
        "maps:get([{protocol,amqp091}], rabbit_global_counters:overview()).",
        timeout=30,
        check=False,
    )
    return {k: int(v) for k, v in re.findall(r"(\w+) => (\d+)", out)}


def _broker_publishes(before: dict[str, int], after: dict[str, int]) -> dict[str, int | None]:
    """Publishes the broker received in confirm mode between two counter readings,
    and how many it confirmed and nacked (received - confirmed)."""

    def delta(key: str) -> int | None:
        if key not in before or key not in after:
            return None
        return after[key] - before[key]

    received = delta("messages_received_confirm_total")
    confirmed = delta("messages_confirmed_total")
    nacked = received - confirmed if received is not None and confirmed is not None else None
    return {"received": received, "confirmed": confirmed, "nacked": nacked}


def _phase_events(events: Sequence[Event], pub: PacedPublisher) -> list[Event]:
    return [e for e in events if e.id.startswith(pub.prefix + "-")]


def _prefixed(run: Run, prefix: str, since: int) -> None:
    """Prefix the names of the checks recorded since index ``since``."""
    for ch in run.checks[since:]:
        if not str(ch["check"]).startswith(prefix):
            ch["check"] = prefix + ch["check"]


def _alarm_phase(
    run: Run,
    node: RabbitNode,
    seconds: float,
    alarm_s: float,
    limit: str,
    sampler: DepthSampler,
) -> tuple[PacedPublisher, dict[str, Any]]:
    """(b): publish through a disk alarm of ``alarm_s`` seconds, then restore the
    disk free limit ``limit``; return the publisher and the fault record."""
    timeout = _publish_timeout(run)
    before = 1.0 if seconds <= 20 else 10.0
    pub = PacedPublisher(run, "b", S11_RATE, seconds + 120, S11_TASK_MS)
    pub.start()
    time.sleep(before)
    sampler.take()
    f = run.fault("disk alarm", at=time.time(), seconds=alarm_s, restore_limit=limit)
    try:
        node.ctl("set_disk_free_limit", "1000GB", timeout=30)
        f["on_at"] = time.time()
        f["set_s"] = round(f["on_at"] - f["at"], 2)
        f["alarms"] = _alarms(node)
        f["alarm_active"] = "disk" in f["alarms"]
        time.sleep(max(0.0, f["on_at"] + alarm_s - time.time()))
    finally:
        f["clear_at"] = time.time()
        _set_disk_free_limit(node, limit)
        f["off_at"] = time.time()
    f["clear_s"] = round(f["off_at"] - f["clear_at"], 2)
    f["depth_max"] = sampler.take()
    f["alarms_after"] = _alarms(node)
    # Publish on for the rest of the phase, and at least 2 s after the alarm cleared.
    end = max(f["at"] - before + seconds, f["off_at"] + 2.0)
    time.sleep(max(0.0, end - time.time()))
    pub.stop_event.set()
    f["publisher_finished"] = pub.join(timeout + 5)
    f["publisher_finished_after_s"] = round(time.time() - end, 2)
    return pub, f


def _check_alarm(run: Run, pub: PacedPublisher, f: dict[str, Any]) -> dict[str, Any]:
    """(b)'s criteria; return its figures.

    A call counts as made during the alarm if it started between the
    ``set_disk_free_limit 1000GB`` command and the one that restored the limit.
    """
    timeout = _publish_timeout(run)
    at, clear, off = f["at"], f["clear_at"], f["off_at"]
    during = [c for c in pub.calls if at <= c.t < clear]
    raised = [c for c in during if c.error is not None]
    # Blocked by the alarm: not refused (a nack is the full queue's answer), no
    # answer until the publish timeout.
    blocked = [c for c in raised if c.error != "PublishNacked" and c.took >= 0.9 * timeout]
    worst = max((c.took for c in pub.calls), default=0.0)
    after = [c for c in pub.calls if c.t >= off and c.error is None]
    resume_s = round(min(c.end for c in after) - off, 3) if after else None
    f["recovery_s"] = resume_s
    figures = {
        "calls_during_alarm": len(during),
        "raised_during_alarm": dict(Counter(c.error for c in raised)),
        "blocked_then_raised_s": [round(c.took, 2) for c in blocked][:10],
        "blocked_detail": blocked[0].detail if blocked else None,
        "confirmed_before_clear": sum(1 for c in during if c.error is None and c.end < clear),
        "confirmed_after_clear_s": [
            round(c.took, 2) for c in during if c.error is None and c.end >= clear
        ][:10],
        "max_delay_s": round(worst, 2),
        "resume_s": resume_s,
    }
    run.check("b:alarm_active", bool(f.get("alarm_active")), f.get("alarms"), "a disk alarm")
    run.check(
        "b:delay_raises_during_alarm",
        bool(blocked) and all(c.took <= timeout + 1 for c in blocked),
        figures["blocked_then_raised_s"],
        f">= 1 call blocked by the alarm raised, each within {timeout + 1:.0f} s",
    )
    run.check(
        "b:delay_bounded",
        worst <= timeout + 1,
        figures["max_delay_s"],
        f"every call <= publish_timeout ({timeout:.0f} s) + 1 s",
    )
    run.check(
        "b:resumes_after_alarm",
        resume_s is not None and resume_s <= 15,
        resume_s,
        "a call started after the alarm cleared is confirmed within 15 s",
    )
    run.check(
        "b:publisher_thread_finished",
        bool(f["publisher_finished"]),
        f["publisher_finished_after_s"],
        f"the publishing thread ends within {timeout + 5:.0f} s of being stopped",
    )
    return figures


def _check_reject_publish(
    run: Run, pub: PacedPublisher, broker: dict[str, int | None]
) -> dict[str, Any]:
    """(a): publishes were nacked, and each nack raised PublishNacked in its own
    ``delay()`` (the broker received each call's message once); return the figures."""
    errors = pub.summary()["errors"]
    nacks = errors.get("PublishNacked", 0)
    run.check(
        "a:nacked_publishes_raise",
        nacks > 0 and set(errors) == {"PublishNacked"},
        errors,
        "> 0 calls raised, every one PublishNacked",
    )
    value = {
        "calls": len(pub.calls),
        "PublishNacked": nacks,
        **{f"broker_{k}": v for k, v in broker.items()},
    }
    run.check(
        "a:publish_failed_equals_nacks",
        broker["received"] == len(pub.calls) and broker["nacked"] == nacks,
        value,
        "the broker received one message per call and nacked exactly the calls that raised",
    )
    return value


def _variant(pub: PacedPublisher, events: Sequence[Event], **more: Any) -> dict[str, Any]:
    c = classify(_phase_events(events, pub))
    return {"publisher": pub.summary(), **_figures(c), **more}


def _s11_rabbit(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    release = h.profile.name == "release"
    max_length = 1000 if release else 100
    seconds = 60.0 if release else 20.0
    alarm_s = 30.0 if release else 15.0
    options = {"max_length": max_length, "overflow": "reject-publish"}
    with h.run("S11", broker, workers=1, concurrency=1, queue_options=options) as run:
        started = time.time()
        node = h.rabbit_node()
        run.extra["setup"] = {
            "max_length": max_length,
            "rate_per_s": S11_RATE,
            "publish_s": seconds,
            "task_ms": S11_TASK_MS,
            "workers": 1,
        }
        run.pool.start()
        time.sleep(1.5)
        sampler = DepthSampler(run.url, run.queue)
        sampler.start()
        alarm: tuple[PacedPublisher, dict[str, Any]] | None = None
        try:
            counters = [_publish_counters(node)]
            a = PacedPublisher(run, "a", S11_RATE, seconds, S11_TASK_MS)
            a.start()
            limit = _disk_free_limit(node) if broker in ALARM_BROKERS else "50MB"
            a.join()
            counters.append(_publish_counters(node))
            depth_a = sampler.take()
            if broker in ALARM_BROKERS:
                alarm = _alarm_phase(run, node, seconds, alarm_s, limit, sampler)
                counters.append(_publish_counters(node))
        finally:
            sampler.stop()
        events, c = _finish(run, 120, quiet=S11_QUIET_S)
        run.standard_checks(c, publish_failed=None)
        variants: dict[str, Any] = {
            "a": _variant(
                a,
                events,
                depth_max=depth_a,
                nacks=_check_reject_publish(run, a, _broker_publishes(counters[0], counters[1])),
            )
        }
        done = {e.id for e in events if e.kind == "done" and e.id.startswith(a.prefix)}
        variants["a"]["consumed_per_s"] = round(len(done) / seconds, 1)
        if alarm is not None:
            b, f = alarm
            variants["b"] = _variant(
                b,
                events,
                broker_publishes=_broker_publishes(counters[1], counters[2]),
                **_check_alarm(run, b, f),
            )
        else:
            variants["b"] = {
                "note": f"run on {', '.join(ALARM_BROKERS)} only: a resource alarm blocks "
                "publishing connections node-wide, whatever the queue type"
            }
        run.extra["variants"] = variants
        row = run.result(c, started=started)
    if broker in DROP_HEAD_BROKERS:
        row = _merge(row, events, *_s11_drop_head(h, broker, seconds, max_length), started)
    return row


def _s11_drop_head(
    h: Harness, broker: BrokerProfile, seconds: float, max_length: int
) -> tuple[dict[str, Any], list[Event]]:
    """(c): ``drop-head`` + DLX: every confirmed id is executed or dead-lettered ``maxlen``."""
    options = {"max_length": max_length, "overflow": "drop-head"}
    with h.run("S11", broker, workers=1, concurrency=1, queue_options=options) as run:
        started = time.time()
        run.pool.start()
        time.sleep(1.5)
        sampler = DepthSampler(run.url, run.queue)
        sampler.start()
        try:
            pub = PacedPublisher(run, "c", S11_RATE, seconds, S11_TASK_MS)
            pub.start()
            pub.join()
        finally:
            sampler.stop()
        events, c = _finish(run, 120, quiet=S11_QUIET_S)
        run.standard_checks(c, dead=None)
        reasons = sorted(c.dead_lettered)
        maxlen = c.dead_lettered.get("maxlen", 0)
        run.check(
            "dead_reason_maxlen",
            reasons == ["maxlen"] and maxlen > 0,
            c.dead_lettered,
            "> 0 dead letters, every one reason maxlen",
        )
        run.check(
            "dead_plus_executed",
            maxlen + c.executed == c.confirmed,
            {"maxlen": maxlen, "executed": c.executed, "confirmed": c.confirmed},
            "dead_lettered[maxlen] + executed = confirmed",
        )
        run.check("dead_duplicates", c.dead_duplicates == 0, c.dead_duplicates, "0")
        _prefixed(run, "c:", 0)
        variant = _variant(pub, events, depth_max=sampler.take(), queue=run.queue)
        row = run.result(c, started=started)
        _prefixed(run, "c:", 0)
    variant["checks"] = row["checks"]
    variant["duration_s"] = row["duration_s"]
    variant["notes"] = row["notes"]
    variant["worker_exits"] = row["worker_exits"]
    return variant, events


def _merge(
    row: dict[str, Any],
    events: list[Event],
    variant: dict[str, Any],
    more_events: list[Event],
    started: float,
) -> dict[str, Any]:
    """Add the drop-head run to the row: its checks, and figures over both runs' ids."""
    c = classify([*events, *more_events])
    row.update({k: v for k, v in c.to_dict().items()})
    row["variants"]["c"] = {k: v for k, v in variant.items() if k != "checks"}
    row["checks"] = [*row["checks"], *variant["checks"]]
    row["passed"] = all(ch["ok"] for ch in row["checks"])
    row["duration_s"] = round(time.time() - started, 1)
    return row


def _error_of(fn: Any) -> str | None:
    """``Type: message`` of what ``fn()`` raised; None if it returned."""
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


def _oom(detail: str | None) -> bool:
    """Whether an error message is Redis' refusal past ``maxmemory`` (redis-py
    raises it as ``OutOfMemoryError``, the server's text starts with ``OOM``)."""
    if not detail:
        return False
    return "OutOfMemoryError" in detail or "OOM " in detail


def _s11_redis(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Redis: ``max_length`` is refused; under ``maxmemory`` + ``noeviction``,
    ``delay()`` raises the OOM error and drops nothing."""
    release = h.profile.name == "release"
    max_length = 1000 if release else 100
    headroom = (8 if release else 1) * 2**20
    with h.run("S11", broker, workers=1, concurrency=1) as run:
        started = time.time()
        # Redis lists have no bound: the transport must refuse one, never ignore it.
        opts = {"max_length": max_length, "overflow": "reject-publish"}
        bounded = build_app({**run.env, "RELIABILITY_QUEUE_OPTIONS": json.dumps(opts)})
        try:
            declare_error = _error_of(lambda: bounded.declare([run.queue]))
            probe = f"{run.scenario}x-{run.rng.getrandbits(64):016x}"
            delay_error = _error_of(
                lambda: bounded.tasks["rel.work"].apply_async((probe, 1.0), task_id=probe)
            )
        finally:
            bounded.close()
        run.extra["max_length"] = {"declare": declare_error, "delay": delay_error}
        refused = ConfigurationError.__name__
        run.check(
            "max_length_refused",
            all(e is not None and e.startswith(refused) for e in (declare_error, delay_error)),
            run.extra["max_length"],
            "ConfigurationError from declare and from delay()",
        )
        # maxmemory reached under noeviction: delay() must raise, not drop.
        server = h.redis_server(broker)  # type: ignore[arg-type]
        client = server.client()
        pub = PacedPublisher(run, "m", S11_RATE, 0.0, 1.0)
        try:
            previous = client.config_get("maxmemory")["maxmemory"]
            policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
            used = int(client.info("memory")["used_memory"])
            memory: dict[str, Any] = {
                "policy": policy,
                "used_before": used,
                "maxmemory": used + headroom,
            }
            client.config_set("maxmemory", used + headroom)
            try:
                deadline = time.monotonic() + 60
                in_a_row = 0
                while time.monotonic() < deadline and in_a_row < 20:
                    call = pub.publish_one()
                    in_a_row = in_a_row + 1 if call.error is not None else 0
                memory["used_at_refusal"] = int(client.info("memory")["used_memory"])
                memory["depth_at_refusal"] = int(client.llen(f"{run.key_prefix}:q:{run.queue}"))
            finally:
                client.config_set("maxmemory", previous)
            memory["restored_maxmemory"] = client.config_get("maxmemory")["maxmemory"]
            after = pub.publish_one()
        finally:
            pub.ledger.close()
            client.close()
        failed = [c for c in pub.calls if c.error is not None]
        memory["calls"] = len(pub.calls)
        memory["errors"] = dict(Counter(c.error for c in failed))
        memory["error_detail"] = failed[0].detail if failed else None
        run.extra["maxmemory"] = memory
        run.check(
            "oom:delay_raises",
            bool(failed) and all(c.error == "PublishError" and _oom(c.detail) for c in failed),
            {"errors": memory["errors"], "detail": memory["error_detail"]},
            "> 0 calls raised PublishError carrying Redis' OOM error",
        )
        run.check(
            "oom:publish_after_restore",
            after.error is None,
            after.error,
            "confirmed once maxmemory is restored",
        )
        run.pool.start()
        events, c = _finish(run, 120, quiet=S11_QUIET_S)
        run.standard_checks(c, publish_failed=None)
        run.extra["variants"] = {"maxmemory": _variant(pub, events)}
        return run.result(c, started=started)


def s11(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Slow consumer, bounded queue: (a) reject-publish, (b) disk alarm, (c) drop-head
    + DLX on RabbitMQ; on Redis, the refusal of ``max_length`` and ``maxmemory``."""
    if broker in ("RD", "RV"):
        return _s11_redis(h, broker)
    return _s11_rabbit(h, broker)
