"""S11: a slow consumer and a bounded queue.

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
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import kombu

from mqtasks.control import HEARTBEAT_INTERVAL
from mqtasks.exceptions import ConfigurationError

from .brokers import RabbitNode
from .harness import Harness
from .ledger import Classification, Event, classify
from .profiles import BrokerProfile
from .publisher import PacedPublisher
from .run import Run
from .steps import finish
from .tasks import build_app

__all__ = ["DepthSampler", "s11"]

#: Publish rate of S11, calls per second.
S11_RATE = 500.0
#: Duration of a ``rel.work`` task in S11, ms (one worker then takes about 100/s).
S11_TASK_MS = 10.0
#: Quiet seconds that end an S11 run once its queues are empty: the publisher has
#: stopped and every call has its answer, so only dead-lettering can be in transit
#: (a dead letter read too late would show as lost, never hide a loss).
S11_QUIET_S = 1.0


def _figures(c: Classification) -> dict[str, Any]:
    """The classification without its samples (for a variant's sub-result)."""
    return {k: v for k, v in c.to_dict().items() if k != "samples"}


def _publish_timeout(run: Run) -> float:
    return float(run.env["MQTASKS_PUBLISH_TIMEOUT"])


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
    run: Run, pub: PacedPublisher, broker: dict[str, int | None], counted_s: float
) -> dict[str, Any]:
    """(a): publishes were nacked, and each nack raised PublishNacked in its own
    ``delay()`` (the broker received each call's message once); return the figures.

    The node's counters also count the worker's heartbeats (confirmed publishes to
    the control exchange, one every HEARTBEAT_INTERVAL s, never nacked): at most
    one per interval of the ``counted_s`` the counters spanned, plus one, is allowed
    over the calls."""
    errors = pub.summary()["errors"]
    nacks = errors.get("PublishNacked", 0)
    run.check(
        "a:nacked_publishes_raise",
        nacks > 0 and set(errors) == {"PublishNacked"},
        errors,
        "> 0 calls raised, every one PublishNacked",
    )
    heartbeats = math.ceil(counted_s / HEARTBEAT_INTERVAL) + 1  # one worker
    value = {
        "calls": len(pub.calls),
        "PublishNacked": nacks,
        "heartbeats_allowed": heartbeats,
        **{f"broker_{k}": v for k, v in broker.items()},
    }
    received = broker["received"]
    run.check(
        "a:publish_failed_equals_nacks",
        received is not None
        and 0 <= received - len(pub.calls) <= heartbeats
        and broker["nacked"] == nacks,
        value,
        "the broker received one message per call (besides the worker's heartbeats) and "
        "nacked exactly the calls that raised",
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
            counted_from = time.monotonic()
            a = PacedPublisher(run, "a", S11_RATE, seconds, S11_TASK_MS)
            a.start()
            limit = _disk_free_limit(node) if broker in ALARM_BROKERS else "50MB"
            a.join()
            counters.append(_publish_counters(node))
            counted_s = time.monotonic() - counted_from
            depth_a = sampler.take()
            if broker in ALARM_BROKERS:
                alarm = _alarm_phase(run, node, seconds, alarm_s, limit, sampler)
                counters.append(_publish_counters(node))
        finally:
            sampler.stop()
        events, c = finish(run, 120, quiet=S11_QUIET_S)
        run.standard_checks(c, publish_failed=None)
        variants: dict[str, Any] = {
            "a": _variant(
                a,
                events,
                depth_max=depth_a,
                nacks=_check_reject_publish(
                    run, a, _broker_publishes(counters[0], counters[1]), counted_s
                ),
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
        events, c = finish(run, 120, quiet=S11_QUIET_S)
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
        events, c = finish(run, 120, quiet=S11_QUIET_S)
        run.standard_checks(c, publish_failed=None)
        run.extra["variants"] = {"maxmemory": _variant(pub, events)}
        return run.result(c, started=started)


def s11(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Slow consumer, bounded queue: (a) reject-publish, (b) disk alarm, (c) drop-head
    + DLX on RabbitMQ; on Redis, the refusal of ``max_length`` and ``maxmemory``."""
    if broker in ("RD", "RV"):
        return _s11_redis(h, broker)
    return _s11_rabbit(h, broker)
