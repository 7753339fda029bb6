"""The systems the benchmark suite compares: mqtasks (with and without confirms, observed),
plain kombu, Celery and Dramatiq, each as a worker command line and a sender."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kombu

from ._workers import BulkSender, Sender
from .throughput import BROKERS, bounded

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
