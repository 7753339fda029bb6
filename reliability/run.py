"""One scenario run on one broker profile: its queue, ledger, workers, faults and figures.

A :class:`Run` is made by :meth:`~reliability.harness.Harness.run` and torn
down when the scenario ends: workers stopped, proxy closed, queues deleted.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import kombu
import redis

from mqtasks import App
from mqtasks.dlq import list_dead_letters
from mqtasks.exceptions import MQTasksError
from mqtasks.serialization import encode_body
from mqtasks.transport import RedisTransport

from .ledger import Checks, Classification, Event, LedgerWriter, read_ledger
from .profiles import CLUSTER_PROFILES, POSTGRES_PROFILES, REDIS_PROFILES, SENTINEL_PROFILES
from .proxy import TcpProxy
from .publisher import Publisher
from .tasks import build_app
from .workers import WorkerPool, worker_argv
from .workload import Job, wmix_ms

if TYPE_CHECKING:
    from .harness import Harness
    from .profiles import BrokerProfile

__all__ = ["Run", "record_dead_letters"]


class Run(Checks):
    """One scenario run on one broker profile: queue, ledger, workers, faults, figures."""

    def __init__(
        self,
        harness: Harness,
        scenario: str,
        broker: BrokerProfile,
        *,
        seed: int,
        workers: int,
        concurrency: int,
        prefetch: int,
        shutdown_timeout: float,
        early_ack: bool,
        delivery_limit: int | None,
        proxy: bool,
        restart: bool,
        queue_type: str | None,
        queue_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.harness = harness
        self.scenario = scenario
        self.broker = broker
        self.seed = seed
        self.rng = random.Random(seed)
        self.profile = harness.profile
        tag = secrets.token_hex(3)
        self.dir = harness.workdir / f"{scenario}-{broker}-{tag}"
        self.ledger_dir = self.dir / "ledger"
        self.ledger_dir.mkdir(parents=True)
        self.queue = f"rel.{scenario.lower()}.{broker.lower()}.{tag}"
        self.key_prefix = f"{{rel-{tag}}}"
        self.url = harness.broker_url(broker)
        self.password = harness.broker_password(broker)
        self.proxy = TcpProxy(int(self.url.rsplit(":", 1)[1].split("/", 1)[0])) if proxy else None
        url = self.proxy.url_for(self.url) if self.proxy is not None else self.url
        self.queue_type = queue_type or ("classic" if broker in ("RC", "KC") else "quorum")
        self.env = {
            "MQTASKS_BROKER_URL": url,
            "MQTASKS_QUEUE_TYPE": self.queue_type,
            "MQTASKS_HEARTBEAT": "10",
            "MQTASKS_PUBLISH_TIMEOUT": "10",
            "RELIABILITY_QUEUE": self.queue,
            "RELIABILITY_LEDGER_DIR": str(self.ledger_dir),
            "RELIABILITY_DELIVERY_LIMIT": str(delivery_limit or ""),
            "RELIABILITY_TRANSPORT_OPTIONS": json.dumps(
                {"key_prefix": self.key_prefix} if self.is_redis else {}
            ),
            "RELIABILITY_QUEUE_OPTIONS": json.dumps(queue_options or {}),
            **harness.broker_env(broker),
        }
        self.app = build_app(self.env)
        self.ledger = LedgerWriter(self.ledger_dir / "harness.jsonl")
        self.pool = WorkerPool(
            worker_argv(
                concurrency=concurrency,
                prefetch=prefetch,
                shutdown_timeout=shutdown_timeout,
                early_ack=early_ack,
            ),
            self.env,
            workers,
            self.dir / "logs",
            restart=restart,
        )
        self.workers = workers
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.t0 = time.time()
        self.faults: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.publisher: Publisher | None = None
        self._closed = False

    @property
    def is_redis(self) -> bool:
        """Whether the broker is Redis."""
        return self.broker in REDIS_PROFILES

    @property
    def is_postgres(self) -> bool:
        """Whether the broker is PostgreSQL (the ``postgresql://`` transport)."""
        return self.broker in POSTGRES_PROFILES

    def rel(self, t: float | None = None) -> float:
        """Seconds since the run started (of epoch time ``t``, or now)."""
        return round((time.time() if t is None else t) - self.t0, 3)

    def bound(self, faults: int, processes_hit: int = 1) -> int:
        """The protocol's Bound(k): in-flight window per fault times faults."""
        return faults * (self.concurrency + self.prefetch) * processes_hit

    # -- workload ---------------------------------------------------------------

    def new_id(self) -> str:
        """A fresh task id (made before the first publish attempt)."""
        return f"{self.scenario}-{self.rng.getrandbits(64):016x}"

    def wmix_jobs(self, n: int, *, noop: bool = False) -> list[Job]:
        """``n`` ``rel.work`` jobs with W-mix (or W-noop) durations."""
        return [
            Job("rel.work", (self.new_id(), 0 if noop else wmix_ms(self.rng))) for _ in range(n)
        ]

    def start_publisher(self, jobs: Sequence[Job], rate: float | None) -> Publisher:
        """Publish ``jobs`` at ``rate`` in the background."""
        self.publisher = Publisher(
            self.app, LedgerWriter(self.ledger_dir / "publisher.jsonl"), rate
        )
        self.publisher.start(jobs)
        return self.publisher

    def publish_all(self, jobs: Sequence[Job]) -> Publisher:
        """Publish ``jobs`` one by one, now, and wait."""
        p = self.start_publisher(jobs, None)
        p.join()
        return p

    def publish_raw_unconfirmed(
        self,
        n: int,
        *,
        stop: threading.Event,
        progress: Callable[[int], None],
        rate: float = 2000.0,
    ) -> None:
        """N1: publish ``n`` transient ``rel.work`` messages with plain kombu, confirms off,
        at about ``rate`` per second.

        A ``publish()`` that returned counts as ``confirmed``, as a caller without
        confirms would believe. Stops at the first error (the broker is gone).
        """
        ledger = LedgerWriter(self.ledger_dir / "publisher.jsonl")
        task = self.app.tasks["rel.work"]
        self.app.declare([self.queue])
        with kombu.Connection(self.url) as conn:  # no confirm_publish: fire and forget
            producer = kombu.Producer(conn.channel(), auto_declare=False)
            for i in range(n):
                if stop.is_set():
                    break
                task_id = self.new_id()
                message = task.message((task_id, 1.0), task_id=task_id)
                body = encode_body(
                    message.args, dict(message.kwargs), max_size=self.app.settings.max_message_size
                )
                env = message.to_envelope(body)
                ledger.record("intent", task_id)
                try:
                    producer.publish(
                        env.body,
                        routing_key=self.queue,
                        headers=dict(env.headers),
                        content_type=env.content_type,
                        content_encoding=env.content_encoding,
                        message_id=env.message_id,
                        delivery_mode=1,  # transient
                        retry=False,
                    )
                except Exception as exc:
                    ledger.record("failed", task_id, error=type(exc).__name__)
                    break
                ledger.record("confirmed", task_id)
                progress(i + 1)
                time.sleep(1 / rate)
        ledger.close()

    # -- faults -----------------------------------------------------------------

    def fault(self, kind: str, **info: Any) -> dict[str, Any]:
        """Record a fault injected now; return its record (figures are added later)."""
        record: dict[str, Any] = {"t": self.rel(), "kind": kind, **info}
        self.faults.append(record)
        return record

    def kill_worker(self, sig: int, *, busy: bool = False) -> dict[str, Any]:
        """Signal a random worker; return the fault record.

        Args:
            sig: The signal.
            busy: Pick among the workers that have started a task, waiting up to
                30 s for one: a worker still importing its app (seconds on a
                loaded machine) has nothing to drain yet.
        """
        among: set[int] | None = None
        if busy:
            deadline = time.monotonic() + 30.0
            while True:
                alive = set(self.pool.pids().values())
                among = {e.pid for e in self.events() if e.kind == "start" and e.pid in alive}
                if among or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        slot, pid = self.pool.signal(sig, rng=self.rng, among=among)
        name = {9: "SIGKILL", 15: "SIGTERM"}.get(sig, str(sig))
        return self.fault(name, slot=slot, pid=pid, at=time.time())

    def redis_client(self) -> redis.Redis[bytes]:
        """A client of the run's Redis (a Sentinel group's current primary)."""
        if self.broker in SENTINEL_PROFILES:
            return self.harness.group(self.broker).client()  # type: ignore[attr-defined,no-any-return]
        return self.harness.redis_server(self.broker).client()  # type: ignore[arg-type]

    # -- waiting ----------------------------------------------------------------

    def depths(self) -> dict[str, int]:
        """Messages not yet finished, by place: ready, delayed, unacked, dead."""
        if self.is_redis:
            client = self.redis_client()
            try:
                p = self.key_prefix
                ready = client.llen(f"{p}:q:{self.queue}")
                delayed = client.zcard(f"{p}:delayed:{self.queue}")
                dead = client.llen(f"{p}:q:{self.queue}.dlq")
                unacked = sum(client.llen(k) for k in client.scan_iter(match=f"{p}:proc:*"))
            finally:
                client.close()
            return {"ready": ready, "delayed": delayed, "unacked": unacked, "dead": dead}
        if self.is_postgres:  # rows of the queue and of its .dlq in the broker's table
            from .postgres_server import queue_depths

            table = str(getattr(self.app.transport, "table", "mqtasks_messages"))
            with self.harness.group(self.broker).connect() as conn:  # type: ignore[attr-defined]
                return queue_depths(conn, table, self.queue)
        if self.broker in CLUSTER_PROFILES:  # as a running node of the cluster tells them
            found = self.harness.group(self.broker).queue_depths()  # type: ignore[attr-defined]
        else:
            found = self.harness.rabbit_node().queue_depths()
        ready = unacked = delayed = dead = 0
        for name, (r, u) in found.items():
            if name == self.queue:
                ready, unacked = r, u
            elif name == self.queue + ".dlq":
                dead = r + u
            elif name.startswith("mqtasks.delay."):
                delayed += r + u
        return {"ready": ready, "delayed": delayed, "unacked": unacked, "dead": dead}

    def ledger_size(self) -> int:
        """Bytes in the ledger so far (grows with every event)."""
        return sum(p.stat().st_size for p in self.ledger_dir.glob("*.jsonl"))

    def wait_quiescent(self, timeout: float, *, quiet: float | None = None) -> bool:
        """Wait until queues are empty, nothing is unacked and the ledger and DLQ
        stay unchanged for ``quiet`` seconds; return False on ``timeout``.
        """
        quiet = self.profile.quiet_s if quiet is None else quiet
        deadline = time.monotonic() + timeout
        last: tuple[int, int] | None = None
        since = time.monotonic()
        while time.monotonic() < deadline:
            if self.publisher is not None and self.publisher.alive:
                time.sleep(1.0)
                continue
            try:
                d = self.depths()
            except Exception as exc:  # the broker may be restarting
                self.notes.append(f"depth check failed: {type(exc).__name__}")
                time.sleep(1.0)
                continue
            state = (self.ledger_size(), d["dead"])
            busy = d["ready"] or d["delayed"] or d["unacked"]
            if busy or state != last:
                last = state
                since = time.monotonic()
            elif time.monotonic() - since >= quiet:
                return True
            time.sleep(1.0 if not self.is_redis else 0.5)
        self.notes.append(f"not quiescent after {timeout:.0f} s: {self.depths()}")
        return False

    def drain_dead_letters(self) -> int:
        """Record every dead-letter entry of the run's queue as a ``dead`` event."""
        return record_dead_letters(self.app, self.queue, self.ledger)

    # -- figures ----------------------------------------------------------------

    def events(self) -> list[Event]:
        """Every ledger event of the run so far."""
        events, torn = read_ledger(self.ledger_dir)
        self.extra["torn_lines"] = torn
        return events

    def worker_recovery(self, events: Sequence[Event]) -> None:
        """Fill ``recovery_s`` of worker-kill faults: until every id the killed
        process had started (and not finished) has started again."""
        for f in self.faults:
            if f["kind"] not in ("SIGKILL", "SIGTERM") or "pid" not in f:
                continue
            pid, at = f["pid"], f["at"]
            open_ids: dict[str, float] = {}
            for e in events:
                if e.pid != pid or e.t > at:
                    continue
                if e.kind == "start":
                    open_ids[e.id] = e.t
                elif e.kind == "done":
                    open_ids.pop(e.id, None)
            delays: dict[str, float | None] = {}
            for task_id in open_ids:
                again = [e.t for e in events if e.id == task_id and e.kind == "start" and e.t > at]
                delays[task_id] = round(min(again) - at, 3) if again else None
            f["in_flight"] = len(open_ids)
            f["redelivery_s"] = delays
            known = [d for d in delays.values() if d is not None]
            f["recovery_s"] = (
                max(known) if known and len(known) == len(delays) else (0.0 if not delays else None)
            )

    def first_done_after(self, events: Sequence[Event], t: float) -> float | None:
        """Seconds from epoch time ``t`` to the first ``done`` after it."""
        later = [e.t for e in events if e.kind == "done" and e.t >= t]
        return round(min(later) - t, 3) if later else None

    def log_events(self, names: Sequence[str]) -> list[tuple[float, str, str]]:
        """(epoch time, event, file) of worker log lines whose event is in ``names``."""
        found = []
        for path in sorted((self.dir / "logs").glob("worker-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if data.get("event") in names and "timestamp" in data:
                    ts = datetime.fromisoformat(
                        data["timestamp"].replace("Z", "+00:00")
                    ).timestamp()
                    found.append((ts, str(data["event"]), path.name))
        return sorted(found)

    def log_count(self, needle: str) -> int:
        """How many times ``needle`` appears in the workers' logs."""
        return self.pool.logs().count(needle)

    def result(self, c: Classification, *, started: float) -> dict[str, Any]:
        """The run's JSON object."""
        if self.publisher is not None:
            self.extra["publisher"] = self.publisher.stats.summary()
        unknown_tag = self.log_count("unknown delivery tag")
        self.check("no_unknown_delivery_tag", unknown_tag == 0, unknown_tag, "0")
        crashed = self.log_count("worker.io_crashed")
        self.check("no_io_thread_crash", crashed == 0, crashed, "0")
        if self.password:
            # Every run's URLs carry the broker's random password (S14 in every scenario).
            texts = self.publisher.stats.texts if self.publisher is not None else set()
            shown = self.log_count(self.password) + sum(t.count(self.password) for t in texts)
            self.check("password_never_shown", shown == 0, shown, "0 in worker logs and errors")
        return {
            "scenario": self.scenario,
            "broker": self.broker,
            "profile": self.profile.name,
            "seed": self.seed,
            **{k: v for k, v in c.to_dict().items() if k != "samples"},
            "samples": c.samples,
            "faults": self.faults,
            "checks": self.checks,
            "passed": self.passed,
            "duration_s": round(time.time() - started, 1),
            "worker_exits": [
                {"slot": e.slot, "pid": e.pid, "code": e.code, "t": self.rel(e.t)}
                for e in self.pool.exits
            ],
            "notes": self.notes,
            **self.extra,
        }

    def close(self) -> None:
        """Stop workers and the proxy, delete the run's queues, close the app."""
        if self._closed:
            return
        self._closed = True
        if self.publisher is not None:
            self.publisher.stop_event.set()
            self.publisher.join(15)
        self.pool.stop(timeout=10)
        if self.proxy is not None:
            self.proxy.close()
        with contextlib.suppress(Exception):
            specs = [self.app.queue(self.queue)]
            from mqtasks.transport.base import dead_letter_spec

            specs.append(dead_letter_spec(specs[0]))
            if isinstance(self.app.transport, RedisTransport):
                client = self.redis_client()
                keys = list(client.scan_iter(match=f"{self.key_prefix}*"))
                if keys:
                    client.delete(*keys)
                client.close()
            else:
                self.app.transport.delete(specs)
        self.app.close()
        self.ledger.close()


def record_dead_letters(app: App, queue: str, ledger: LedgerWriter) -> int:
    """Record every dead-letter entry of ``queue`` as a ``dead`` event; return how many."""
    try:
        entries = list_dead_letters(app, queue, limit=None)
    except MQTasksError as exc:
        if "does not exist" in str(exc):
            return 0
        raise
    for e in entries:
        ledger.record(
            "dead",
            e.id,
            attempt=e.attempts,
            reason=e.reason,
            exception=e.exception,
            detail=e.detail,
            queue=e.queue,
            traceback_bytes=len(e.traceback or ""),
            delivery_count=e.headers.get("x-delivery-count"),
            failed_at=e.failed_at.timestamp() if e.failed_at else None,
        )
    return len(entries)
