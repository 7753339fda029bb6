"""mqtasks against Celery, Dramatiq and plain kombu, on the local RabbitMQ and Redis, in one run.

For every broker, system and round, with the same no-op task ``noop(seq, sent)``:

1. **publish**: the suite (one thread) publishes N tasks, no worker running;
2. **drain**: the system's worker is started as a separate process (group) and empties
   the queue; rate from the first task start to the last;
3. **pipeline**: ``--publishers`` threads publish N more tasks while the (now warm) worker
   consumes; rate = N / (last task start - first publish);
4. **latency at idle**: ``--latency-samples`` tasks one at a time (the next is sent once the
   previous one has started, after a random 1-5 ms pause);
5. **latency under load**: tasks paced at 70 % of the pipeline rate of that round;
6. the worker's **peak RSS** (``VmHWM`` summed over its process tree) and its CPU time per
   task during the drain.

Send-to-start latency = the task's ``time.time()`` at start minus the publisher's
``time.time()`` just before the publish call, carried in the task's arguments. See
``benchmarks/_record.py`` for how tasks report (the same for every system), and
``benchmarks/README.md`` for the options and how to read the tables.

Run ``python -m benchmarks.suite --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import kombu
import structlog

from ._record import RECORD, measure, read_records
from .throughput import BROKERS, _sweep_redis, bounded, machine_info, peak_rss_mib, split

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: Seconds between two looks at the record files while waiting for tasks.
POLL = 0.005
#: The same, when waiting for a single task (idle latency).
POLL_FINE = 0.0005
CLK_TCK = os.sysconf("SC_CLK_TCK")

Sender = Callable[[int, float], None]
BulkSender = Callable[[list[tuple[int, float]]], None]


# -- what the workers report ----------------------------------------------------------------


class Records:
    """The record files of one worker run; counts finished tasks by file size."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def sizes(self) -> dict[str, int]:
        out = {}
        with os.scandir(self.directory) as it:
            for entry in it:
                if entry.name.endswith(".rec"):
                    out[entry.name] = entry.stat().st_size
        return out

    def count(self, since: dict[str, int] | None = None) -> int:
        since = since or {}
        total = sum(size - since.get(name, 0) for name, size in self.sizes().items())
        return total // RECORD.size

    def read(self, since: dict[str, int] | None = None) -> list[tuple[int, float, float]]:
        return read_records(self.directory, since)


def wait_count(
    records: Records,
    since: dict[str, int],
    target: int,
    *,
    timeout: float,
    stall: float,
    poll: float = POLL,
    alive: Callable[[], bool] = lambda: True,
) -> tuple[str, int]:
    """Wait until ``target`` tasks have started; return (status, count)."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while True:
        value = records.count(since)
        now = time.monotonic()
        if value >= target:
            return "ok", value
        if value != last:
            last, last_change = value, now
        elif now - last_change > stall:
            return f"stalled at {value}/{target} for {stall:.0f}s", value
        if now > deadline:
            return f"timeout at {value}/{target}", value
        if not alive():
            return f"worker exited at {value}/{target}", value
        time.sleep(poll)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)

    def pick(q: float) -> float:
        k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
        return values[k]

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "max": values[-1]}


# -- worker processes ------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(x) for x in fh.read().split())
    return out


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def tree_hwm_mib(pid: int) -> list[float]:
    """Peak RSS (VmHWM) of each process of the tree rooted at ``pid``, in MiB."""
    out = []
    for p in tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    out.append(int(line.split()[1]) / 1024)
    return out


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by the live processes of the tree."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{p}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


class WorkerProcess:
    """A worker command in its own process group, always ended with the group."""

    live: list[WorkerProcess] = []

    def __init__(self, argv: list[str], env: dict[str, str], log_path: str) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        WorkerProcess.live.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM to the group, up to ``grace`` seconds, then SIGKILL to the group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        code = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = self.proc.wait(grace)
        # Anything left in the group (a prefork child, a stuck main process) goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5.0)
        self._log.close()
        with contextlib.suppress(ValueError):
            WorkerProcess.live.remove(self)
        return code

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError), open(self.log_path, "rb") as fh:
            return b"\n".join(fh.read().splitlines()[-lines:]).decode(errors="replace")
        return ""


# -- the systems ------------------------------------------------------------------------------


@dataclass
class Context:
    run_id: str
    run_dir: str
    opts: argparse.Namespace
    amqp_queues: set[str] = field(default_factory=set)
    amqp_exchanges: set[str] = field(default_factory=set)


def close_mqtasks_app(app: Any, queue: str) -> None:
    """Delete ``queue`` through an mqtasks ``app``'s transport, then close the app (if any)."""
    if app is not None:
        with contextlib.suppress(Exception):
            bounded(lambda: app.transport.delete([app.queue(queue)]), 30, "delete")
        bounded(app.close, 30, "app.close")


def mqtasks_worker_argv(module: str) -> list[str]:
    """The mqtasks worker's command line for the app in ``module`` (8 threads, warnings)."""
    return [
        sys.executable, "-m", "mqtasks", "worker", "-A", module,
        "-c", "8", "--log-level", "warning", "--log-format", "console",
    ]  # fmt: skip


def add_worker_options(p: argparse.ArgumentParser) -> None:
    """Add the options on the workers' lives: --stall, --startup, --grace and --keep."""
    p.add_argument("--stall", type=float, default=20.0, help="seconds without progress = stall")
    p.add_argument("--startup", type=float, default=60.0, help="seconds for a worker to start")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--keep", action="store_true", help="keep the record files and worker logs")


class System:
    """One system under test on one broker: how to publish, and how to start its worker."""

    name = ""
    config = ""

    def __init__(self, broker: str, ctx: Context) -> None:
        self.broker = broker
        self.url = BROKERS[broker]
        self.amqp = broker == "amqp"
        self.ctx = ctx
        self.queue = f"bench-{ctx.run_id}-{broker}-{self.name}"
        self.keyprefix = f"bench-{ctx.run_id}-{broker}-{self.name}:"
        if self.amqp:
            ctx.amqp_queues.add(self.queue)

    # publishing
    def setup(self) -> None:
        """Create the publishing side (in this process)."""

    def sender(self) -> tuple[Sender, Callable[[], None]]:
        """A send function for one thread, and how to close it."""
        raise NotImplementedError

    #: How :meth:`bulk_sender` publishes, for the configurations under the table.
    bulk_how = "no bulk publish call: one send per task in a loop, one thread"

    def bulk_sender(self) -> tuple[BulkSender, Callable[[], None]]:
        """A function publishing a batch of ``(seq, sent)`` tasks, and how to close it.

        The system's own bulk call where it has one; a loop of single sends otherwise.
        """
        send, close = self.sender()

        def bulk(items: list[tuple[int, float]]) -> None:
            for seq, sent in items:
                send(seq, sent)

        return bulk, close

    def block(self) -> contextlib.AbstractContextManager[Any] | None:
        """A block inside which publishes wait for their confirms together, at its end.

        ``None`` when the system has no such block (all but mqtasks, and an mqtasks
        without ``App.publishing()``): its "in a block" rows read n/a.
        """
        return None

    def has_block(self) -> bool:
        """Whether :meth:`block` gives a block (asked without making one)."""
        return False

    def close(self) -> None:
        """Close the publishing side."""

    # the worker
    def worker_argv(self) -> list[str]:
        raise NotImplementedError

    def worker_env(self, record_dir: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BENCH_BROKER_URL=self.url,
            BENCH_QUEUE=self.queue,
            BENCH_RECORD_DIR=record_dir,
            BENCH_KEYPREFIX=self.keyprefix,
            PYTHONUNBUFFERED="1",
        )
        env.pop("MQTASKS_BROKER_URL", None)
        return env

    def purge(self) -> None:
        """Remove ready messages left by an earlier, incomplete round."""
        if self.amqp:
            with kombu.Connection(self.url, connect_timeout=5) as conn:
                channel = conn.channel()
                with contextlib.suppress(Exception):
                    channel.queue_purge(self.queue)


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


class MqtasksSystem(System):
    name = "mqtasks"
    confirm = True

    @property
    def config(self) -> str:  # type: ignore[override]
        if not self.amqp:
            return "mqtasks worker -c 8 (1 process, prefetch 16), acks late, mqtasks' own redis://"
        return "mqtasks worker -c 8 (1 process, prefetch 16), acks late, quorum queue, " + (
            "publisher confirms on (default)" if self.confirm else "publisher confirms OFF"
        )

    def setup(self) -> None:
        from mqtasks.transport.queue import DLQ_SUFFIX

        from .bench_mqtasks_app import make_app

        self.app, self.noop = make_app(
            self.url,
            self.queue,
            confirm=self.confirm,
            keyprefix=self.keyprefix,
            **self.app_options(),
        )
        self.app.declare()
        if self.amqp:  # mqtasks declares the queue's dead-letter queue beside it
            self.ctx.amqp_queues.add(self.queue + DLQ_SUFFIX)

    def app_options(self) -> dict[str, Any]:
        """More keyword arguments for ``make_app`` (the observed system's)."""
        return {}

    def sender(self) -> tuple[Sender, Callable[[], None]]:
        return self.noop.delay, lambda: None

    bulk_how = (
        "noop.starmap() in batches of --batch tasks, one thread: on RabbitMQ each batch "
        "returns once the broker has confirmed all of it (confirms pipelined on one channel)"
    )

    def bulk_sender(self) -> tuple[BulkSender, Callable[[], None]]:
        starmap = self.noop.starmap

        def bulk(items: list[tuple[int, float]]) -> None:
            starmap(items)

        return bulk, lambda: None

    def block(self) -> contextlib.AbstractContextManager[Any] | None:
        # App.publishing() is newer than this suite's first version: the suite runs on
        # an mqtasks without it too, and says n/a.
        publishing = getattr(self.app, "publishing", None)
        return publishing() if publishing is not None else None

    def has_block(self) -> bool:
        return hasattr(self.app, "publishing")

    def purge(self) -> None:
        # Through the transport, so that it also empties the queue on Redis (the block's
        # publishes, no worker running, must not add to the drain's N).
        with contextlib.suppress(Exception):
            bounded(lambda: self.app.transport.purge([self.app.queue(self.queue)]), 30, "purge")

    def close(self) -> None:
        close_mqtasks_app(getattr(self, "app", None), self.queue)

    def worker_argv(self) -> list[str]:
        return mqtasks_worker_argv("benchmarks.bench_mqtasks_app")

    def worker_env(self, record_dir: str) -> dict[str, str]:
        env = super().worker_env(record_dir)
        env["BENCH_CONFIRM"] = "1" if self.confirm else "0"
        return env


class MqtasksNoConfirmSystem(MqtasksSystem):
    name = "mqtasks-noconfirm"
    confirm = False
    bulk_how = "noop.starmap() in batches of --batch tasks, one thread (starmap() always confirms)"


class MqtasksObservedSystem(MqtasksSystem):
    """mqtasks with logs, metrics and traces all on, publisher and worker alike.

    Set against ``mqtasks`` (the defaults: log context on, no tracer provider, no StatsD)
    in the table "Observability on", for the cost of observability in this benchmark.
    """

    name = "mqtasks-observed"

    @property
    def config(self) -> str:  # type: ignore[override]
        return (
            super().config + "; observability on: every span recorded (OTel SDK, batch span "
            "processor, spans dropped), JSON logs at info to a file, StatsD to a UDP socket "
            "read by another process"
        )

    def setup(self) -> None:
        from ._observe import StatsdSink

        self.sink = StatsdSink()
        super().setup()

    def app_options(self) -> dict[str, Any]:
        return {"observe": True, "statsd_url": self.sink.url()}

    def close(self) -> None:
        try:
            super().close()
        finally:
            sink = getattr(self, "sink", None)
            if sink is not None:
                with contextlib.suppress(Exception):
                    sink.close()

    def worker_argv(self) -> list[str]:
        argv = super().worker_argv()
        argv[argv.index("--log-level") + 1] = "info"
        argv[argv.index("--log-format") + 1] = "json"
        return argv

    def worker_env(self, record_dir: str) -> dict[str, str]:
        env = super().worker_env(record_dir)
        env.update(BENCH_OBSERVE="1", BENCH_STATSD_URL=self.sink.url())
        return env


def mqtasks_message_fields(queue: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The headers and content properties mqtasks sends, taken from a real message."""
    from mqtasks.serialization import encode_body

    from .bench_mqtasks_app import make_app

    _, noop = make_app("memory://", queue)
    message = noop.message((0, 0.0))
    envelope = message.to_envelope(encode_body(message.args, {}, max_size=1 << 20))
    props = {"content_type": envelope.content_type, "content_encoding": envelope.content_encoding}
    return dict(envelope.headers), props


def kombu_sender(
    producer: kombu.Producer,
    queue: str,
    headers: dict[str, Any],
    props: dict[str, str],
    mandatory: bool,
) -> Sender:
    """``producer.publish()`` of the message mqtasks sends for ``noop(seq, sent)``."""
    dumps = json.dumps

    def send(seq: int, sent: float) -> None:
        h = dict(headers)
        h["mqtasks-published-at"] = sent
        producer.publish(
            dumps({"args": [seq, sent], "kwargs": {}}).encode(),
            exchange="",
            routing_key=queue,
            headers=h,
            message_id=str(uuid.uuid4()),
            delivery_mode=2,
            mandatory=mandatory,
            timeout=10,
            confirm_timeout=10,
            **props,
        )

    return send


class KombuSystem(System):
    name = "kombu"

    @property
    def config(self) -> str:  # type: ignore[override]
        return "one-thread kombu.Consumer, manual ack after the task, prefetch 16, " + (
            "quorum queue; publish without confirms (+ a confirm-per-message figure)"
            if self.amqp
            else "stock Redis transport"
        )

    def setup(self) -> None:
        from . import bench_kombu_worker as kw

        self.kw = kw
        self.kqueue = kw.queue_for(self.url, self.queue)
        self.headers, self.props = mqtasks_message_fields(self.queue)
        with self.connection() as conn:
            self.kqueue.bind(conn.default_channel).declare()

    def connection(self, *, confirm: bool = False) -> kombu.Connection:
        options = self.kw.transport_options(self.url, self.keyprefix)
        if confirm and self.amqp:
            options["confirm_publish"] = True
        return kombu.Connection(self.url, connect_timeout=5, transport_options=options)

    def sender(self, *, confirm: bool = False) -> tuple[Sender, Callable[[], None]]:
        conn = self.connection(confirm=confirm)
        conn.ensure_connection(max_retries=3)
        producer = kombu.Producer(conn.channel(), auto_declare=False)
        return kombu_sender(producer, self.queue, self.headers, self.props, self.amqp), conn.release

    def close(self) -> None:
        if hasattr(self, "kqueue"):
            with self.connection() as conn, contextlib.suppress(Exception):
                self.kqueue.bind(conn.default_channel).delete()

    def worker_argv(self) -> list[str]:
        return [sys.executable, "-m", "benchmarks.bench_kombu_worker"]

    def worker_env(self, record_dir: str) -> dict[str, str]:
        env = super().worker_env(record_dir)
        env["BENCH_PREFETCH"] = "16"
        return env


class CelerySystem(System):
    name = "celery-prefork2"
    pool = "prefork"
    concurrency = 2

    @property
    def config(self) -> str:  # type: ignore[override]
        c = f"-P {self.pool}" + (f" -c {self.concurrency}" if self.pool != "solo" else "")
        return (
            f"celery worker {c} -O fair, acks_late, prefetch multiplier "
            f"{self.multiplier} (16 unacked), no gossip/mingle/heartbeat/remote control, "
            + ("classic queue, no publisher confirms (default)" if self.amqp else "kombu Redis")
        )

    @property
    def multiplier(self) -> int:
        return 16 // (1 if self.pool == "solo" else self.concurrency)

    def setup(self) -> None:
        import warnings

        from .bench_celery_app import make_app

        # Each round builds a new app with the same task name; Celery warns about that.
        warnings.filterwarnings("ignore", message="Task name 'bench.noop'")
        self.app = make_app(
            self.url, self.queue, keyprefix=self.keyprefix, prefetch_multiplier=self.multiplier
        )
        self.noop = self.app.tasks["bench.noop"]
        if self.amqp:
            self.ctx.amqp_exchanges.add(self.queue)  # Celery's exchange named after the queue

    def sender(self) -> tuple[Sender, Callable[[], None]]:
        return self.noop.delay, lambda: None

    def close(self) -> None:
        app = getattr(self, "app", None)
        if app is not None:
            with contextlib.suppress(Exception):
                bounded(app.close, 30, "celery app.close")

    def worker_argv(self) -> list[str]:
        argv = [
            _bin("celery"), "-A", "benchmarks.bench_celery_app", "worker",
            "-P", self.pool, "-O", "fair", "-Q", self.queue,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"{self.queue}@%h", "--loglevel", "WARNING",
        ]  # fmt: skip
        if self.pool != "solo":
            argv += ["-c", str(self.concurrency)]
        return argv

    def worker_env(self, record_dir: str) -> dict[str, str]:
        env = super().worker_env(record_dir)
        env["BENCH_PREFETCH_MULTIPLIER"] = str(self.multiplier)
        return env


class CelerySoloSystem(CelerySystem):
    name = "celery-solo"
    pool = "solo"


class DramatiqSystem(System):
    name = "dramatiq"

    @property
    def config(self) -> str:  # type: ignore[override]
        return "dramatiq -p 2 -t 8 (prefetch 16 per process), default middleware, ack after " + (
            "the actor, classic queue, no confirms (default)"
            if self.amqp
            else "the actor, its Lua-scripted RedisBroker"
        )

    def setup(self) -> None:
        from .bench_dramatiq_app import make_broker

        self.dbroker, self.actor = make_broker(self.url, self.queue, keyprefix=self.keyprefix)
        if self.amqp:
            self.ctx.amqp_queues.update({f"{self.queue}.DQ", f"{self.queue}.XQ"})

    def sender(self) -> tuple[Sender, Callable[[], None]]:
        return self.actor.send, lambda: None

    def close(self) -> None:
        broker = getattr(self, "dbroker", None)
        if broker is not None:
            with contextlib.suppress(Exception):
                bounded(broker.close, 30, "dramatiq broker.close")

    def worker_argv(self) -> list[str]:
        return [
            _bin("dramatiq"), "benchmarks.bench_dramatiq_app",
            "-p", "2", "-t", "8", "-Q", self.queue, "--worker-shutdown-timeout", "5000",
        ]  # fmt: skip


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (
        MqtasksSystem,
        MqtasksNoConfirmSystem,
        MqtasksObservedSystem,
        KombuSystem,
        CelerySystem,
        CelerySoloSystem,
        DramatiqSystem,
    )
}
#: Systems that differ from another only on RabbitMQ (Redis has no publisher confirms).
AMQP_ONLY = {"mqtasks-noconfirm"}


# -- one round of one system on one broker -----------------------------------------------------


class PhaseError(Exception):
    pass


def _seq_base(phase: int) -> int:
    return phase * 10_000_000


def publish_threads(
    system: System, count: int, threads: int, base: int, *, rate: float | None = None
) -> tuple[float, float, list[str]]:
    """Publish ``count`` tasks from ``threads`` threads (paced at ``rate``/s in all if given).

    Returns (t0 wall time, seconds until the last publish returned, errors).
    """
    errors: list[str] = []
    shares = split(count, threads)
    senders = [system.sender() for _ in range(threads)]
    ends: list[float] = []
    barrier = threading.Barrier(threads + 1)
    t0_box: list[float] = []

    def run(i: int, share: int) -> None:
        send, _ = senders[i]
        start_seq = base + sum(shares[:i])
        interval = threads / rate if rate else 0.0
        try:
            barrier.wait(30)
            t0 = t0_box[0]
            deadline = time.monotonic() + system.ctx.opts.timeout
            for k in range(share):
                if interval:
                    # Open loop: each thread sends on its own schedule, offset so that the
                    # threads interleave; when behind, it sends at once.
                    due = t0 + (k + i / threads) * interval
                    pause = due - time.time()
                    if pause > 0:
                        time.sleep(pause)
                send(start_seq + k, time.time())
                if not k & 255 and time.monotonic() > deadline:
                    errors.append(f"publisher {i} timed out at {k}/{share}")
                    return
        except BaseException as exc:  # reported, not raised, from a thread
            errors.append(f"publisher {i}: {exc!r}")
        finally:
            ends.append(time.time())

    workers = [
        threading.Thread(target=run, args=(i, s), name=f"bench-pub-{i}", daemon=True)
        for i, s in enumerate(shares)
    ]
    for t in workers:
        t.start()
    t0_box.append(time.time())
    barrier.wait(30)
    for t in workers:
        t.join(system.ctx.opts.timeout + 30)
        if t.is_alive():
            errors.append(f"{t.name} still running")
    for _, close in senders:
        with contextlib.suppress(Exception):
            close()
    return t0_box[0], (max(ends) if ends else time.time()) - t0_box[0], errors


def publish_bulk(
    system: System, count: int, batch: int, base: int
) -> tuple[float, float, list[str]]:
    """Publish ``count`` tasks from one thread with the system's bulk call, ``batch`` at a time.

    Returns (t0 wall time, seconds until the last batch returned, errors).
    """
    bulk, close = system.bulk_sender()

    def run(deadline: float, errors: list[str]) -> None:
        for start in range(0, count, batch):
            sent = time.time()
            bulk([(base + k, sent) for k in range(start, min(count, start + batch))])
            if time.monotonic() > deadline:
                errors.append(f"bulk publisher timed out at {start + batch}/{count}")
                break

    return _timed(system, "bulk publisher", run, close)


def publish_block(system: System, count: int, base: int) -> tuple[float, float, list[str]]:
    """One thread calls ``delay()`` in a plain loop inside the system's block.

    The time runs until the block has ended, every message confirmed. Returns
    (t0 wall time, seconds, errors).
    """
    send, close = system.sender()

    def run(deadline: float, errors: list[str]) -> None:
        block = system.block()
        if block is None:
            raise RuntimeError(f"{system.name} has no block to publish in")
        with block:
            for k in range(count):
                send(base + k, time.time())
                if not k & 255 and time.monotonic() > deadline:
                    errors.append(f"block publisher timed out at {k}/{count}")
                    break

    return _timed(system, "block publisher", run, close)


def _timed(
    system: System,
    what: str,
    run: Callable[[float, list[str]], None],
    close: Callable[[], None],
) -> tuple[float, float, list[str]]:
    """Time ``run(deadline, errors)`` from one thread, then ``close()``.

    Returns (t0 wall time, seconds until ``run`` returned or raised, errors).
    """
    errors: list[str] = []
    t0 = time.time()
    try:
        run(time.monotonic() + system.ctx.opts.timeout, errors)
    except Exception as exc:
        errors.append(f"{what}: {exc!r}")
    finally:
        with contextlib.suppress(Exception):
            close()
    return t0, time.time() - t0, errors


#: Seq phase of the one-thread loops inside a block (see :func:`_seq_base`).
BLOCK_PHASE = 8

#: The pipeline phases, in order: result key and seq phase (see :func:`_seq_base`).
PIPELINES = [("pipeline1", 4), ("pipeline", 1), ("pipeline_bulk", 5)]


def run_round(system: System, rnd: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Run every phase for ``system``; return its figures for this round."""
    opts = system.ctx.opts
    n = opts.tasks
    out: dict[str, Any] = {"broker": system.broker, "system": system.name, "round": rnd}
    problems: list[str] = []
    out["problems"] = problems
    record_dir = os.path.join(system.ctx.run_dir, f"{system.broker}-{system.name}-r{rnd}")
    records = Records(record_dir)
    system.purge()

    if system.amqp and isinstance(system, MqtasksSystem) and system.confirm:
        # Confirmed publishing at speed: N from --publishers threads, then N with the
        # bulk call, each call returning once its own messages are confirmed; set
        # against the one-confirm-per-message rate below. No worker runs yet, and
        # the queue is purged afterwards, so the drain starts from N like the others'.
        warm, warm_close = system.sender()
        try:
            warm(-1, time.time())
        finally:
            warm_close()
        for key, phase in (("publish_threads", 6), ("publish_bulk", 7)):
            base = _seq_base(phase)
            if key == "publish_threads":
                _, pub_s, errors = publish_threads(system, n, opts.publishers, base)
            else:
                _, pub_s, errors = publish_bulk(system, n, opts.batch, base)
            problems.extend(f"{key}: {e}" for e in errors)
            if pub_s > 0 and not errors:
                out[f"{key}_per_s"] = n / pub_s
        system.purge()

    out["block"] = system.has_block()
    if out["block"]:
        # The one-thread loop inside a block, no worker running: the plain loop a user
        # writes, with the confirms awaited together at the block's end. Purged after,
        # so that the drain starts from N like the others'.
        warm, warm_close = system.sender()
        try:
            warm(-1, time.time())
        finally:
            warm_close()
        _, pub_s, errors = publish_block(system, n, _seq_base(BLOCK_PHASE))
        problems.extend(f"publish in a block: {e}" for e in errors)
        if pub_s > 0 and not errors:
            out["publish_block_loop_per_s"] = n / pub_s
        system.purge()

    # 1. publish, no worker: one thread calling delay()/send()/publish() in a plain loop.
    # One warm-up publish first (connects, declares), outside timing.
    send, close = system.sender()
    try:
        send(-1, time.time())
        deadline = time.monotonic() + opts.timeout
        t0 = time.perf_counter()
        published = 0
        for published in range(1, n + 1):
            send(published - 1, time.time())
            if not published & 255 and time.monotonic() > deadline:
                problems.append(f"publish timed out at {published}/{n}")
                break
        out["publish_per_s"] = published / (time.perf_counter() - t0)
    finally:
        close()
    if isinstance(system, KombuSystem) and system.amqp:
        # Plain kombu with one confirm per message, as mqtasks does by default: a figure of
        # its own; the messages go to the same queue and are drained with the rest.
        csend, cclose = system.sender(confirm=True)
        try:
            m = max(1, n // 4)
            t0 = time.perf_counter()
            for k in range(m):
                csend(_seq_base(9) + k, time.time())
            out["publish_confirm_per_s"] = m / (time.perf_counter() - t0)
            published += m
        finally:
            cclose()
    log(
        f"publish {out['publish_per_s']:,.0f}/s"
        + "".join(
            f", {key.split('_')[1]} {out[key + '_per_s']:,.0f}/s"
            for key in ("publish_threads", "publish_bulk", "publish_block_loop")
            if key + "_per_s" in out
        )
    )

    # 2. drain, by a freshly started worker process.
    worker = WorkerProcess(
        system.worker_argv(),
        system.worker_env(record_dir),
        os.path.join(system.ctx.run_dir, f"{system.broker}-{system.name}-r{rnd}.log"),
    )
    try:
        target = published + 1  # and the warm-up task
        status, _ = wait_count(
            records, {}, 1, timeout=opts.startup, stall=opts.startup, alive=worker.alive
        )
        if status != "ok":
            raise PhaseError(f"worker did not start a task: {status}\n{worker.tail()}")
        cpu0 = tree_cpu_s(worker.pid)
        cmds0 = redis_commands() if not system.amqp else None
        seen0 = records.count()
        status, got = wait_count(
            records, {}, target, timeout=opts.timeout, stall=opts.stall, alive=worker.alive
        )
        cpu1 = tree_cpu_s(worker.pid)
        cmds1 = redis_commands() if not system.amqp else None
        if status != "ok":
            problems.append(f"drain: {status}")
        recs = records.read()
        starts = sorted(r[2] for r in recs)
        if len(starts) > 1:
            out["drain_per_s"] = (len(starts) - 1) / (starts[-1] - starts[0])
        done = got - seen0
        if done > 0:
            out["worker_cpu_us_per_task"] = (cpu1 - cpu0) / done * 1e6
            if cmds0 is not None and cmds1 is not None:
                out["redis_cmds_per_task"] = (cmds1 - cmds0) / done
        log(f"drain {out.get('drain_per_s', 0):,.0f}/s ({status})")

        # 3. pipelines: publishers and the warm worker at once; one thread with a call per
        # task, --publishers threads with a call per task, one thread with the bulk call.
        # Then, where the system has a block, the one-thread loop inside it: not one of
        # the three ways of the best-of figure, which stays comparable with earlier runs.
        block_way = [("pipeline_block_loop", BLOCK_PHASE)] if out["block"] else []
        for key, phase in PIPELINES + block_way:
            since = records.sizes()
            base = _seq_base(phase)
            if key == "pipeline1":
                t0, pub_s, errors = publish_threads(system, n, 1, base)
            elif key == "pipeline":
                t0, pub_s, errors = publish_threads(system, n, opts.publishers, base)
            elif key == "pipeline_bulk":
                t0, pub_s, errors = publish_bulk(system, n, opts.batch, base)
            else:
                t0, pub_s, errors = publish_block(system, n, base)
            problems.extend(f"{key}: {e}" for e in errors)
            status, got = wait_count(
                records, since, n, timeout=opts.timeout, stall=opts.stall, alive=worker.alive
            )
            if status != "ok":
                problems.append(f"{key}: {status}")
            recs = [r for r in records.read(since) if base <= r[0] < _seq_base(phase + 1)]
            if recs:
                last = max(r[2] for r in recs)
                out[f"{key}_per_s"] = len(recs) / (last - t0)
                out[f"{key}_publish_per_s"] = n / pub_s if pub_s > 0 else None
            log(f"{key} {out.get(f'{key}_per_s', 0):,.0f}/s ({status})")
        rates = [out[f"{key}_per_s"] for key, _ in PIPELINES if f"{key}_per_s" in out]
        if rates:
            out["pipeline_best_per_s"] = max(rates)

        # 4. latency at idle: one task at a time.
        rng = random.Random(rnd)
        since = records.sizes()
        base = _seq_base(2)
        send, close = system.sender()
        try:
            for k in range(opts.latency_samples):
                send(base + k, time.time())
                status, _ = wait_count(
                    records, since, k + 1, timeout=10, stall=10, poll=POLL_FINE, alive=worker.alive
                )
                if status != "ok":
                    problems.append(f"idle latency: sample {k}: {status}")
                    break
                time.sleep(rng.uniform(0.001, 0.005))
        finally:
            close()
        lat = [(r[2] - r[1]) * 1000 for r in records.read(since) if r[0] >= base]
        out["idle_latency_ms"] = percentiles(lat)
        if lat:
            log("idle latency p50 {p50:.2f} p99 {p99:.2f} ms".format(**out["idle_latency_ms"]))

        # 5. latency at 70 % of this round's pipeline rate.
        peak = out.get("pipeline_per_s")
        if peak:
            rate = opts.load * peak
            m = min(n, max(300, int(rate * opts.load_seconds)))
            since = records.sizes()
            base = _seq_base(3)
            t0, pub_s, errors = publish_threads(system, m, opts.publishers, base, rate=rate)
            problems.extend(f"loaded latency: {e}" for e in errors)
            status, _ = wait_count(
                records, since, m, timeout=opts.timeout, stall=opts.stall, alive=worker.alive
            )
            if status != "ok":
                problems.append(f"loaded latency: {status}")
            lat = [(r[2] - r[1]) * 1000 for r in records.read(since) if r[0] >= base]
            out["load_latency_ms"] = percentiles(lat)
            out["load_target_per_s"] = rate
            out["load_sent_per_s"] = m / pub_s if pub_s > 0 else None
            if lat:
                log(
                    "latency at {:,.0f}/s (sent {:,.0f}/s): p50 {p50:.2f} p99 {p99:.2f} ms".format(
                        rate, out["load_sent_per_s"] or 0, **out["load_latency_ms"]
                    )
                )

        # 6. memory.
        hwm = tree_hwm_mib(worker.pid)
        out["worker_rss_mib"] = sum(hwm)
        out["worker_rss_each_mib"] = [round(x, 1) for x in hwm]
        out["worker_processes"] = len(hwm)
        dup = len(records.read()) - len({r[0] for r in records.read()})
        if dup:
            out["duplicates"] = dup
    except PhaseError as exc:
        problems.append(str(exc))
    finally:
        code = worker.stop(grace=opts.grace)
        out["worker_exit"] = code
        if problems:
            out["worker_log_tail"] = worker.tail()
    return out


def redis_commands() -> int | None:
    """Commands processed by the Redis server so far (all clients: the server is shared)."""
    import redis

    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(BROKERS["redis"], socket_timeout=3)
        try:
            return int(client.info("stats")["total_commands_processed"])
        finally:
            client.close()
    return None


# -- summary ---------------------------------------------------------------------------------

#: key, label, higher is better, format
METRICS: list[tuple[str, str, bool, str]] = [
    ("publish_per_s", "publish/s, one-thread loop, no worker", True, "{:,.0f}"),
    (
        "publish_block_loop_per_s",
        "publish/s, one-thread loop in a block (mqtasks), no worker",
        True,
        "{:,.0f}",
    ),
    ("publish_confirm_per_s", "publish/s, kombu with a confirm per message", True, "{:,.0f}"),
    (
        "publish_threads_per_s",
        "publish/s, {publishers} threads, each call confirmed (mqtasks)",
        True,
        "{:,.0f}",
    ),
    ("publish_bulk_per_s", "publish/s, bulk call, each batch confirmed (mqtasks)", True, "{:,.0f}"),
    ("drain_per_s", "drain/s", True, "{:,.0f}"),
    (
        "pipeline1_per_s",
        "pipeline/s, one-thread loop (1 publisher, a call per task)",
        True,
        "{:,.0f}",
    ),
    (
        "pipeline_per_s",
        "pipeline/s, {publishers} publisher threads, a call per task",
        True,
        "{:,.0f}",
    ),
    ("pipeline_bulk_per_s", "pipeline/s, bulk publish from 1 thread (see below)", True, "{:,.0f}"),
    ("pipeline_best_per_s", "pipeline/s, the best of these three ways", True, "{:,.0f}"),
    (
        "pipeline_block_loop_per_s",
        "pipeline/s, one-thread loop in a block (mqtasks)",
        True,
        "{:,.0f}",
    ),
    ("idle_latency_ms.p50", "latency idle p50 ms", False, "{:.2f}"),
    ("idle_latency_ms.p95", "latency idle p95 ms", False, "{:.2f}"),
    ("idle_latency_ms.p99", "latency idle p99 ms", False, "{:.2f}"),
    ("load_latency_ms.p50", "latency at 70% p50 ms", False, "{:.2f}"),
    ("load_latency_ms.p95", "latency at 70% p95 ms", False, "{:.2f}"),
    ("load_latency_ms.p99", "latency at 70% p99 ms", False, "{:.2f}"),
    ("worker_rss_mib", "worker peak RSS MiB", False, "{:.1f}"),
    ("worker_cpu_us_per_task", "worker CPU µs/task (drain)", False, "{:,.0f}"),
    ("redis_cmds_per_task", "Redis cmds/task (drain, whole server)", False, "{:.1f}"),
]


def _get(d: dict[str, Any], key: str) -> float | None:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d if isinstance(d, (int, float)) else None  # type: ignore[return-value]


def summarise(
    rounds: list[dict[str, Any]], brokers: list[str], systems: list[str]
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for broker in brokers:
        b: dict[str, Any] = {}
        for name in systems:
            rs = [r for r in rounds if r["broker"] == broker and r["system"] == name]
            if not rs:
                continue
            s: dict[str, Any] = {
                "rounds": len(rs),
                "problems": sum(len(r["problems"]) for r in rs),
                "block": any(r.get("block") for r in rs),
            }
            for key, *_ in METRICS:
                values = [v for v in (_get(r, key) for r in rs) if v is not None]
                if values:
                    s[key] = {
                        "median": statistics.median(values),
                        "min": min(values),
                        "max": max(values),
                    }
            b[name] = s
        summary[broker] = b
    return summary


def _cell(stat: dict[str, float] | None, fmt: str, spread: bool) -> str:
    if not stat:
        return "n/a"
    text = fmt.format(stat["median"])
    if spread and stat["min"] != stat["max"]:
        text += f" ({fmt.format(stat['min'])}-{fmt.format(stat['max'])})"
    return text


def markdown(summary: dict[str, Any], header: str, publishers: int) -> str:
    lines = [header, ""]
    for broker, systems in summary.items():
        names = list(systems)
        if not names:
            continue
        lines.append(f"### {'RabbitMQ' if broker == 'amqp' else 'Redis'} ({broker})")
        lines.append("")
        lines.append("Median over the rounds (min-max).")
        lines.append("")
        lines.append("| metric | " + " | ".join(names) + " |")
        lines.append("|---|" + "---:|" * len(names))
        for key, label, _, fmt in METRICS:
            cells = [_cell(systems[n].get(key), fmt, True) for n in names]
            if all(c == "n/a" for c in cells):
                continue
            lines.append(f"| {label.format(publishers=publishers)} | " + " | ".join(cells) + " |")
        bad = [f"{n}: {systems[n]['problems']}" for n in names if systems[n]["problems"]]
        if bad:
            lines.append("")
            lines.append("Rounds with problems (see the JSON): " + ", ".join(bad))
        mq = [n for n in names if n.startswith("mqtasks")]
        peers = [n for n in names if not n.startswith("mqtasks")]
        lines.extend(_loop_table(systems, names, mq, peers))
        if mq and peers:
            lines.append("")
            lines.append(
                "Ratios of medians, mqtasks / peer (rates: above 1 is better for mqtasks; "
                "latency, RSS, CPU, commands: below 1 is better for mqtasks)."
            )
            lines.append("")
            cols = [(m, p) for m in mq for p in peers]
            lines.append("| metric | " + " | ".join(f"{m} / {p}" for m, p in cols) + " |")
            lines.append("|---|" + "---:|" * len(cols))
            for key, label, _, _ in METRICS:
                if key == "publish_confirm_per_s":
                    # mqtasks' confirmed publish against kombu's confirmed publish.
                    row = []
                    for m, p in cols:
                        a = systems[m].get("publish_per_s")
                        c = systems[p].get(key)
                        row.append(f"{a['median'] / c['median']:.2f}" if a and c else "n/a")
                    if any(x != "n/a" for x in row):
                        lines.append(
                            "| publish/s vs kombu with a confirm per message | "
                            + " | ".join(row)
                            + " |"
                        )
                    continue
                row = []
                for m, p in cols:
                    a, c = systems[m].get(key), systems[p].get(key)
                    row.append(
                        f"{a['median'] / c['median']:.2f}" if a and c and c["median"] else "n/a"
                    )
                if any(x != "n/a" for x in row):
                    lines.append(
                        f"| {label.format(publishers=publishers)} | " + " | ".join(row) + " |"
                    )
        confirmed = [n for n in mq if systems[n].get("publish_threads_per_s")]
        if confirmed:
            lines.append("")
            lines.append(
                "Confirmed publishing: the rate of each way over the one-confirm-per-message "
                "rate (mqtasks' own 1-thread `delay()`, and plain kombu's where it ran)."
            )
            lines.append("")
            lines.append("| system, way | publish/s | / 1 thread | / kombu confirm per message |")
            lines.append("|---|---:|---:|---:|")
            kombu = systems.get("kombu", {}).get("publish_confirm_per_s")
            for n in confirmed:
                one = systems[n].get("publish_per_s")
                for key in ("publish_threads_per_s", "publish_bulk_per_s"):
                    stat = systems[n].get(key)
                    if not stat:
                        continue
                    way = f"{publishers} threads" if key == "publish_threads_per_s" else "bulk"
                    vs_one = f"{stat['median'] / one['median']:.2f}" if one else "n/a"
                    vs_kombu = f"{stat['median'] / kombu['median']:.2f}" if kombu else "n/a"
                    lines.append(
                        f"| {n}, {way} | {_cell(stat, '{:,.0f}', True)} | {vs_one} | {vs_kombu} |"
                    )
        if "mqtasks" in systems and "mqtasks-observed" in systems:
            lines.extend(
                _observed_table(systems["mqtasks"], systems["mqtasks-observed"], publishers)
            )
        lines.append("")
    return "\n".join(lines)


#: The rows of the one-thread loop table: key, label, and the peers' key it is set against
#: (a block's loop against the peer's plain loop: the peers have no block).
LOOP_ROWS: list[tuple[str, str, str]] = [
    ("publish_per_s", "publish/s, no worker running", "publish_per_s"),
    ("publish_block_loop_per_s", "publish/s, in a block, no worker running", "publish_per_s"),
    ("pipeline1_per_s", "pipeline (publish while a worker runs), end to end/s", "pipeline1_per_s"),
    ("pipeline_block_loop_per_s", "pipeline, in a block, end to end/s", "pipeline1_per_s"),
]


def _loop_table(
    systems: dict[str, Any], names: list[str], mq: list[str], peers: list[str]
) -> list[str]:
    """Lines of the table of one thread publishing in a plain loop, and its ratios."""
    lines = [
        "",
        "One thread calling `delay()` / `send()` / `publish()` in a plain loop, as a script "
        'enqueueing a backlog or a request handler does; "in a block" is the same loop '
        "inside `with app.publishing():` (mqtasks only; its confirms are awaited together "
        "at the block's end).",
        "",
        "| one-thread loop | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key, label, _ in LOOP_ROWS:
        cells = []
        for n in names:
            in_block = key.startswith(("publish_block", "pipeline_block"))
            if in_block and n.startswith("mqtasks") and not systems[n].get("block"):
                cells.append("n/a (no `App.publishing()`)")
                continue
            cells.append(_cell(systems[n].get(key), "{:,.0f}", True))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cols = [(m, p) for m in mq for p in peers]
    if cols:
        lines += [
            "",
            "| ratio, mqtasks / peer's plain loop | "
            + " | ".join(f"{m} / {p}" for m, p in cols)
            + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for key, label, peer_key in LOOP_ROWS:
            row = []
            for m, p in cols:
                a, c = systems[m].get(key), systems[p].get(peer_key)
                row.append(f"{a['median'] / c['median']:.2f}" if a and c else "n/a")
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        if "kombu" in peers:
            row = []
            kombu = systems["kombu"].get("publish_confirm_per_s")
            for m, p in cols:
                a = systems[m].get("publish_per_s")
                ok = a and kombu and p == "kombu"
                row.append(f"{a['median'] / kombu['median']:.2f}" if ok else "")
            if kombu:
                lines.append(
                    "| publish/s, no worker, against kombu with a confirm per message | "
                    + " | ".join(row)
                    + " |"
                )
    return lines


#: The rows of the "Observability on" table: key, label, a rate (the cost is 1 - ratio).
OBSERVED_ROWS = [
    ("publish_per_s", "publish/s (1 thread, each call confirmed on RabbitMQ)", True),
    ("drain_per_s", "drain/s", True),
    ("pipeline1_per_s", "pipeline/s, 1 publisher thread", True),
    ("pipeline_per_s", "pipeline/s, {publishers} publisher threads", True),
    ("pipeline_bulk_per_s", "pipeline/s, bulk publish", True),
    ("pipeline_best_per_s", "pipeline/s, the best of these three ways", True),
    ("publish_block_loop_per_s", "publish/s, one-thread loop in a block", True),
    ("pipeline_block_loop_per_s", "pipeline/s, one-thread loop in a block", True),
    ("worker_cpu_us_per_task", "worker CPU µs/task (drain)", False),
    ("idle_latency_ms.p50", "latency idle p50 ms", False),
    ("idle_latency_ms.p99", "latency idle p99 ms", False),
]


def _observed_table(base: dict[str, Any], observed: dict[str, Any], publishers: int) -> list[str]:
    """Lines of the table setting mqtasks with observability on against its defaults."""
    lines = [
        "",
        "Observability on: `mqtasks-observed` (every span recorded, JSON logs, StatsD) "
        "against `mqtasks` (the defaults: log context, no tracer provider, no StatsD), "
        "medians; the cost is the share of throughput lost.",
        "",
        "| metric | mqtasks | mqtasks-observed | observed / mqtasks | cost |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label, rate in OBSERVED_ROWS:
        a, b = base.get(key), observed.get(key)
        if not a or not b:
            continue
        fmt = "{:,.0f}" if rate or "cpu" in key else "{:.2f}"
        ratio = b["median"] / a["median"] if a["median"] else 0.0
        cost = f"{1 - ratio:.0%}" if rate and ratio else ""
        lines.append(
            f"| {label.format(publishers=publishers)} | {_cell(a, fmt, True)} | "
            f"{_cell(b, fmt, True)} | {ratio:.2f} | {cost} |"
        )
    return lines


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.suite",
        description="mqtasks against Celery, Dramatiq and plain kombu on local RabbitMQ and Redis.",
    )
    p.add_argument("--tasks", type=int, default=10_000, help="tasks per throughput phase (10000)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; medians reported (3)")
    p.add_argument("--brokers", default="amqp,redis", help="comma-separated: amqp,redis")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated, from {','.join(SYSTEMS)}",
    )
    p.add_argument(
        "--publishers", type=int, default=8, help="publisher threads, pipeline and load (8)"
    )
    p.add_argument("--batch", type=int, default=100, help="tasks per bulk publish call (100)")
    p.add_argument("--latency-samples", type=int, default=200, help="idle latency samples (200)")
    p.add_argument("--load", type=float, default=0.7, help="load latency: fraction of peak (0.7)")
    p.add_argument("--load-seconds", type=float, default=3.0, help="load latency duration (3)")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per phase (120)")
    add_worker_options(p)
    opts = p.parse_args(argv)
    opts.broker_list = [b.strip() for b in opts.brokers.split(",") if b.strip()]
    opts.system_list = [s.strip() for s in opts.systems.split(",") if s.strip()]
    bad = [b for b in opts.broker_list if b not in BROKERS]
    bad += [s for s in opts.system_list if s not in SYSTEMS]
    if bad:
        p.error(f"unknown broker(s)/system(s) {bad}")
    if min(opts.tasks, opts.repeat, opts.publishers, opts.latency_samples, opts.batch) < 1:
        p.error("--tasks, --repeat, --publishers, --batch and --latency-samples must be at least 1")
    for url in BROKERS.values():
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            p.error("refusing a non-loopback broker")
    return opts


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _cleanup_amqp(ctx: Context) -> None:
    try:
        with kombu.Connection(BROKERS["amqp"], connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=2)
            for name in sorted(ctx.amqp_queues):
                channel = conn.channel()  # a failed delete closes its channel
                with contextlib.suppress(Exception):
                    channel.queue_delete(name)
                with contextlib.suppress(Exception):
                    channel.close()
            for name in sorted(ctx.amqp_exchanges):
                channel = conn.channel()
                with contextlib.suppress(Exception):
                    channel.exchange_delete(name)
                with contextlib.suppress(Exception):
                    channel.close()
    except Exception as exc:
        print(f"warning: RabbitMQ cleanup failed: {exc!r}", file=sys.stderr)


@contextlib.contextmanager
def _systems(broker: str, names: list[str], ctx: Context) -> Iterator[list[System]]:
    made: list[System] = []
    try:
        for name in names:
            if broker != "amqp" and name in AMQP_ONLY:
                continue
            s = SYSTEMS[name](broker, ctx)
            made.append(s)
            s.setup()
        yield made
    finally:
        for s in made:
            try:
                s.close()
            except Exception as exc:
                print(f"warning: closing {s.name} on {broker}: {exc!r}", file=sys.stderr)


def run_header(peers: Sequence[str]) -> tuple[dict[str, Any], str]:
    """The machine's description with the peers' versions added, and the one-line header."""
    from importlib import metadata

    info = machine_info()
    for dist in peers:
        with contextlib.suppress(Exception):
            info[dist] = metadata.version(dist)
    header = (
        f"mqtasks {info['mqtasks']} (commit {info['commit']}) | celery {info.get('celery')} | "
        f"dramatiq {info.get('dramatiq')} | kombu {info['kombu']} | Python {info['python']} | "
        f"RabbitMQ {info.get('rabbitmq', '?')} | Redis {info.get('redis_server', '?')} | "
        f"nproc {info['nproc']} | load at start {info['loadavg']}"
    )
    return info, header


def print_configs(configs: dict[str, dict[str, str]]) -> None:
    """Print each broker's and system's configuration line, as the summary's footnote."""
    for broker, cs in configs.items():
        for name, text in cs.items():
            print(f"  {broker} {name}: {text}")


def write_json(path: str, doc: dict[str, Any]) -> None:
    """Write a run's document to ``path`` (its folder made if missing) and say so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # The publishers log as an application would in production, warnings and above, as
    # the workers do (--log-level warning): a debug line per task would be measured too.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    signal.signal(signal.SIGTERM, _interrupt)
    run_id = uuid.uuid4().hex[:8]
    run_dir = os.path.join(HERE, "results", f"run-{run_id}")
    os.makedirs(run_dir, exist_ok=True)
    ctx = Context(run_id, run_dir, opts)
    info, header = run_header(("celery", "dramatiq", "pika"))
    print(header)
    print(
        f"run {run_id}: {opts.tasks} tasks, {opts.repeat} round(s), {opts.publishers} pipeline "
        f"publisher threads, bulk batches of {opts.batch}, {opts.latency_samples} idle samples, load {opts.load:.0%} for "
        f"{opts.load_seconds:.0f} s; systems {','.join(opts.system_list)}",
        flush=True,
    )
    rounds: list[dict[str, Any]] = []
    configs: dict[str, dict[str, str]] = {}
    status = 0
    started = time.monotonic()
    try:
        for rnd in range(opts.repeat):
            for broker in opts.broker_list:
                # Rotate the order each round, so that drift does not favour a system.
                k = rnd % len(opts.system_list)
                order = opts.system_list[k:] + opts.system_list[:k]
                with _systems(broker, order, ctx) as systems:
                    for system in systems:
                        configs.setdefault(broker, {})[system.name] = (
                            f"{system.config}; bulk pipeline: {system.bulk_how}"
                        )
                        measure(
                            rounds,
                            rnd,
                            broker,
                            system.name,
                            lambda log, s=system, r=rnd: run_round(s, r, log),
                        )
    except KeyboardInterrupt:
        print("interrupted; stopping workers and deleting queues", file=sys.stderr)
        status = 130
    except Exception as exc:
        import traceback

        traceback.print_exc()
        print(f"suite failed: {exc!r}", file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the cleanup
        for w in list(WorkerProcess.live):
            w.stop(grace=2.0)
        if "amqp" in opts.broker_list:
            _cleanup_amqp(ctx)
        if "redis" in opts.broker_list:
            _sweep_redis(BROKERS["redis"], f"bench-{run_id}")
        signal.signal(signal.SIGTERM, _interrupt)
    wall = time.monotonic() - started
    summary = summarise(rounds, opts.broker_list, opts.system_list)
    head = (
        f"{header}\n\n{opts.tasks} tasks per phase, {len({r['round'] for r in rounds})} "
        f"round(s), wall time {wall / 60:.1f} min, suite peak RSS {peak_rss_mib():.0f} MiB."
    )
    table = markdown(summary, head, opts.publishers)
    print()
    print(table)
    print("Configurations:")
    print_configs(configs)
    if opts.json:
        doc = {
            "run_id": run_id,
            "machine": info,
            "options": {k: v for k, v in vars(opts).items() if k not in ("json", "markdown")},
            "wall_seconds": round(wall, 1),
            "configs": configs,
            "summary": summary,
            "rounds": rounds,
        }
        write_json(opts.json, doc)
    if opts.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(opts.markdown)), exist_ok=True)
        with open(opts.markdown, "w") as fh:
            fh.write(table + "\n")
        print(f"wrote {opts.markdown}")
    if opts.keep or status:
        print(f"records and worker logs kept in {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    if any(r["problems"] for r in rounds) and status == 0:
        status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
