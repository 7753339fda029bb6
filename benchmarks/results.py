"""Results and workflows: mqtasks against Celery and Dramatiq, with results in Redis, in one run.

For every broker (the local RabbitMQ and Redis) and round, each system's worker runs as its
own process, started with the suite's command line (``benchmarks/suite.py``), and stores
its results in the local Redis (database 11, the run's own key prefix per system):

1. **round trip**: ``delay().get()`` one at a time against an idle worker (mqtasks, Celery
   with its Redis result backend, Dramatiq with its ``Results`` middleware and
   ``RedisBackend``); ``--samples`` timed calls after ``--warmup`` untimed ones, a random
   1-5 ms pause between calls; p50 and p99 of the wall time of each call.
2. **throughput with results**: ``--publishers`` threads publish ``--tasks`` no-op tasks
   returning a small value while the worker runs; the rate is N divided by the time from
   the publishers' start until every result is stored (the backend is asked, with MGET,
   for the results not yet seen once every task has started). mqtasks with results,
   mqtasks with ``ignore_result=True`` on the same worker, mqtasks without a backend (its
   own worker), and Celery with results. Without results the end is the last task's start.
3. **chord**: ``chord([value.s(i) for i in range(--chord-size)], tally.s()).delay().get()``,
   mqtasks against Celery; the time from ``delay()`` until ``get()`` returns the callback's
   value, after an untimed chord of 10.

Every queue and key of the run carries the run's id and is deleted at the end, also after an
error, Ctrl-C or SIGTERM. Run ``python -m benchmarks.results --help``; see
``benchmarks/README.md`` ("Results and workflows").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import random
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import structlog

from ._record import measure, target_lines
from ._systems import Context, _bin, add_worker_options, close_mqtasks_app, mqtasks_worker_argv
from ._workers import Records, WorkerProcess, percentiles, tree_cpu_s, wait_count
from .suite import (
    _cleanup_amqp,
    print_configs,
    publish_threads,
    redis_commands,
    run_header,
    write_json,
)
from .throughput import BROKERS, _sweep_redis, bounded

HERE = os.path.dirname(os.path.abspath(__file__))
#: Where every system stores its results: a database of its own on the local Redis.
BACKEND_URL = "redis://127.0.0.1:6379/11"
#: Seconds between two looks at the backend for the results not seen yet.
STORED_POLL = 0.002
#: Task seq numbers of the throughput phase (and of the start-up probe, -1).
THROUGHPUT_BASE = 10_000_000

PHASES = ("latency", "throughput", "chord")

Sender = Callable[[int, float], None]


#: Set by SIGINT or SIGTERM. The handler also raises KeyboardInterrupt where the main
#: thread is, but a library may swallow it there: the phases look at this flag too.
STOP = threading.Event()


def _stop(signum: int, frame: Any) -> None:
    STOP.set()
    raise KeyboardInterrupt(f"signal {signum}")


def check_stop() -> None:
    """Raise KeyboardInterrupt once a stop was asked for."""
    if STOP.is_set():
        raise KeyboardInterrupt("stop requested")


def _id_sender(delay: Callable[..., Any], ids: list[str]) -> tuple[Sender, Callable[[], None]]:
    """A sender that publishes with ``delay`` and keeps each task's id in ``ids``."""
    append = ids.append

    def send(seq: int, sent: float) -> None:
        append(delay(seq, sent).id)

    return send, lambda: None


class SideError(Exception):
    """A system could not run a phase (its worker did not start, a result was wrong)."""


# -- the systems ----------------------------------------------------------------------------


class Side:
    """One system on one broker: its worker, and how the benchmark publishes and waits."""

    name = ""
    #: Which phases the system takes part in.
    phases: tuple[str, ...] = ()
    #: Whether it runs on RabbitMQ only.
    amqp_only = False
    config = ""

    def __init__(self, broker: str, ctx: Context) -> None:
        self.broker = broker
        self.url = BROKERS[broker]
        self.amqp = broker == "amqp"
        self.ctx = ctx
        tag = f"bench-{ctx.run_id}-{broker}-{self.name}"
        self.queue = tag
        self.keyprefix = tag + ":"
        self.backend_prefix = tag + "-results:"
        if self.amqp:
            ctx.amqp_queues.add(self.queue)

    def setup(self) -> None:
        """Create the publishing side (in this process)."""

    def close(self) -> None:
        """Close the publishing side."""

    def worker_argv(self) -> list[str]:
        raise NotImplementedError

    def worker_env(self, record_dir: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BENCH_BROKER_URL=self.url,
            BENCH_QUEUE=self.queue,
            BENCH_RECORD_DIR=record_dir,
            BENCH_KEYPREFIX=self.keyprefix,
            BENCH_BACKEND_PREFIX=self.backend_prefix,
            PYTHONUNBUFFERED="1",
        )
        for name in ("MQTASKS_BROKER_URL", "MQTASKS_BACKEND_URL"):
            env.pop(name, None)
        return env

    def probe(self) -> None:
        """Publish ``rnoop(-1, now)``, whose start the worker records: it tells it is up."""
        raise NotImplementedError

    # phases
    def roundtrip(self, x: int, timeout: float) -> Any:
        """``delay(x)`` then wait for its result; return it."""
        raise NotImplementedError

    def throughput_variants(self) -> list[tuple[str, bool]]:
        """``(variant name, stores results)`` of the throughput phase on this worker."""
        return []

    def sender(self, variant: str, ids: list[str]) -> tuple[Sender, Callable[[], None]]:
        """A send function for one publisher thread, adding each task id to ``ids``."""
        raise NotImplementedError

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` whose result is not stored yet (one MGET per 1,000 ids)."""
        raise NotImplementedError

    def chord(self, size: int, timeout: float) -> tuple[Any, float, float | None]:
        """Run a chord of ``size`` ``value`` members and a ``tally`` callback.

        Returns its value, the seconds from ``delay()`` until ``get()`` returned it, and the
        seconds from ``delay()`` until the callback's result was made (the time stamp the
        worker puts in it: mqtasks' ``at``, Celery's ``date_done``), which leaves out what
        ``get()`` itself costs after that.
        """
        raise NotImplementedError


class MqtasksSide(Side):
    name = "mqtasks"
    phases: tuple[str, ...] = ("latency", "throughput", "chord")
    backend = True
    #: On RabbitMQ, a classic queue and no publisher confirms (Celery's and Dramatiq's defaults).
    classic = False

    @property
    def config(self) -> str:  # type: ignore[override]
        return (
            "mqtasks worker -c 8 (1 process, prefetch 16), acks late, "
            + ("quorum queue, confirms on" if self.amqp else "mqtasks' own redis://")
            + (f", backend {BACKEND_URL} (backend_key_prefix)" if self.backend else ", no backend")
        )

    def backend_url(self) -> str:
        return BACKEND_URL if self.backend else ""

    def setup(self) -> None:
        from mqtasks.transport.queue import DLQ_SUFFIX

        from .bench_results_mqtasks_app import make_app

        self.app = make_app(
            self.url,
            self.queue,
            backend_url=self.backend_url(),
            backend_prefix=self.backend_prefix,
            keyprefix=self.keyprefix,
            classic=self.classic,
        )
        self.app.declare()
        if self.amqp:
            self.ctx.amqp_queues.add(self.queue + DLQ_SUFFIX)

    def task(self, name: str) -> Any:
        return self.app.tasks[name]

    def close(self) -> None:
        close_mqtasks_app(getattr(self, "app", None), self.queue)

    def worker_argv(self) -> list[str]:
        return mqtasks_worker_argv("benchmarks.bench_results_mqtasks_app")

    def worker_env(self, record_dir: str) -> dict[str, str]:
        env = super().worker_env(record_dir)
        env["BENCH_BACKEND_URL"] = self.backend_url()
        env["BENCH_CLASSIC"] = "1" if self.classic else "0"
        return env

    def probe(self) -> None:
        self.task("bench.rnoop").delay(-1, time.time())

    def roundtrip(self, x: int, timeout: float) -> Any:
        return self.task("bench.value").delay(x).get(timeout=timeout)

    def throughput_variants(self) -> list[tuple[str, bool]]:
        return [("mqtasks, results", True), ("mqtasks, ignore_result", False)]

    def sender(self, variant: str, ids: list[str]) -> tuple[Sender, Callable[[], None]]:
        return _id_sender(
            self.task("bench.rnoop_ignored" if "ignore" in variant else "bench.rnoop").delay, ids
        )

    def missing(self, ids: Sequence[str]) -> list[str]:
        backend = self.app.backend
        out: list[str] = []
        for i in range(0, len(ids), 1000):
            chunk = ids[i : i + 1000]
            out.extend(
                t for t, got in zip(chunk, backend.get_results(chunk), strict=True) if got is None
            )
        return out

    def chord(self, size: int, timeout: float) -> tuple[Any, float, float | None]:
        try:
            from mqtasks import chord
        except ImportError:
            from mqtasks.canvas import chord  # type: ignore[no-redef]
        from mqtasks.result import decode_outcome

        value, tally = self.task("bench.value"), self.task("bench.tally")
        header = [value.s(i) for i in range(size)]
        wall0, t0 = time.time(), time.perf_counter()
        handle = chord(header, tally.s()).delay()
        got = handle.get(timeout=timeout)
        seconds = time.perf_counter() - t0
        stored = self.app.backend.get_result(handle.id)
        at = decode_outcome(stored[0]).at if stored is not None else None
        return got, seconds, (at - wall0 if at else None)


class MqtasksNoBackendSide(MqtasksSide):
    """The same app and worker without a result backend: the throughput to keep."""

    name = "mqtasks-nobackend"
    phases = ("throughput",)
    backend = False

    def throughput_variants(self) -> list[tuple[str, bool]]:
        return [("mqtasks, no backend", False)]


class MqtasksClassicSide(MqtasksSide):
    """On RabbitMQ, a classic queue and no publisher confirms, as Celery's and Dramatiq's.

    Round trips only: it shows how much of mqtasks' round trip is the confirm and the
    quorum queue, which the other two do not have by default.
    """

    name = "mqtasks-classic"
    phases = ("latency",)
    amqp_only = True
    classic = True

    @property
    def config(self) -> str:  # type: ignore[override]
        return (
            "mqtasks worker -c 8 (1 process, prefetch 16), acks late, classic queue, "
            f"confirms OFF, backend {BACKEND_URL} (backend_key_prefix)"
        )


class CelerySide(Side):
    name = "celery"
    phases = ("latency", "throughput", "chord")
    #: The suite's ``celery-prefork2``: 2 processes, 8 unacked each.
    concurrency = 2
    multiplier = 8

    @property
    def config(self) -> str:  # type: ignore[override]
        return (
            f"celery worker -P prefork -c {self.concurrency} -O fair, acks_late, prefetch "
            f"multiplier {self.multiplier}, "
            + ("classic queue, no confirms" if self.amqp else "kombu Redis")
            + f", result backend {BACKEND_URL} (global_keyprefix)"
        )

    def setup(self) -> None:
        import warnings

        from .bench_results_celery_app import make_app

        # Each round builds a new app with the same task names; Celery warns about that.
        warnings.filterwarnings("ignore", message="Task name 'bench.")
        self.app = make_app(
            self.url,
            self.queue,
            backend_url=BACKEND_URL,
            backend_prefix=self.backend_prefix,
            keyprefix=self.keyprefix,
            prefetch_multiplier=self.multiplier,
        )
        if self.amqp:
            self.ctx.amqp_exchanges.add(self.queue)  # Celery's exchange named after the queue

    def close(self) -> None:
        app = getattr(self, "app", None)
        if app is not None:
            with contextlib.suppress(Exception):
                bounded(app.close, 30, "celery app.close")

    def worker_argv(self) -> list[str]:
        return [
            _bin("celery"), "-A", "benchmarks.bench_results_celery_app", "worker",
            "-P", "prefork", "-c", str(self.concurrency), "-O", "fair", "-Q", self.queue,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"{self.queue}@%h", "--loglevel", "WARNING",
        ]  # fmt: skip

    def worker_env(self, record_dir: str) -> dict[str, str]:
        env = super().worker_env(record_dir)
        env.update(BENCH_PREFETCH_MULTIPLIER=str(self.multiplier), BENCH_BACKEND_URL=BACKEND_URL)
        return env

    def probe(self) -> None:
        self.app.tasks["bench.rnoop"].delay(-1, time.time())

    def roundtrip(self, x: int, timeout: float) -> Any:
        return self.app.tasks["bench.value"].delay(x).get(timeout=timeout)

    def throughput_variants(self) -> list[tuple[str, bool]]:
        return [("celery, results", True)]

    def sender(self, variant: str, ids: list[str]) -> tuple[Sender, Callable[[], None]]:
        return _id_sender(self.app.tasks["bench.rnoop"].delay, ids)

    def missing(self, ids: Sequence[str]) -> list[str]:
        backend = self.app.backend
        out: list[str] = []
        for i in range(0, len(ids), 1000):
            chunk = ids[i : i + 1000]
            got = backend.client.mget([backend.get_key_for_task(t) for t in chunk])
            out.extend(t for t, v in zip(chunk, got, strict=True) if v is None)
        return out

    def chord(self, size: int, timeout: float) -> tuple[Any, float, float | None]:
        from celery import chord

        value, tally = self.app.tasks["bench.value"], self.app.tasks["bench.tally"]
        header = [value.s(i) for i in range(size)]
        wall0, t0 = time.time(), time.perf_counter()
        result = chord(header, tally.s()).delay()
        got = result.get(timeout=timeout)
        seconds = time.perf_counter() - t0
        done = self.app.backend.get_task_meta(result.id).get("date_done")
        if isinstance(done, str):
            done = datetime.datetime.fromisoformat(done)
        at = done.timestamp() if done is not None else None
        return got, seconds, (at - wall0 if at else None)


class DramatiqSide(Side):
    name = "dramatiq"
    phases = ("latency",)

    @property
    def config(self) -> str:  # type: ignore[override]
        return (
            "dramatiq -p 2 -t 8 (prefetch 16 per process), default middleware + Results "
            f"(RedisBackend {BACKEND_URL}, namespace), "
            + ("classic queue, no confirms" if self.amqp else "its Lua-scripted RedisBroker")
        )

    def setup(self) -> None:
        from .bench_results_dramatiq_app import make_results_broker

        self.dbroker, self.value, self.rnoop, self.backend = make_results_broker(
            self.url,
            self.queue,
            backend_url=BACKEND_URL,
            backend_prefix=self.backend_prefix,
            keyprefix=self.keyprefix,
        )
        if self.amqp:
            self.ctx.amqp_queues.update({f"{self.queue}.DQ", f"{self.queue}.XQ"})

    def close(self) -> None:
        broker = getattr(self, "dbroker", None)
        if broker is not None:
            with contextlib.suppress(Exception):
                bounded(broker.close, 30, "dramatiq broker.close")
        backend = getattr(self, "backend", None)
        if backend is not None:
            with contextlib.suppress(Exception):
                backend.client.close()

    def worker_argv(self) -> list[str]:
        return [
            _bin("dramatiq"), "benchmarks.bench_results_dramatiq_app",
            "-p", "2", "-t", "8", "-Q", self.queue, "--worker-shutdown-timeout", "5000",
        ]  # fmt: skip

    def worker_env(self, record_dir: str) -> dict[str, str]:
        env = super().worker_env(record_dir)
        env["BENCH_BACKEND_URL"] = BACKEND_URL
        return env

    def probe(self) -> None:
        self.rnoop.send(-1, time.time())

    def roundtrip(self, x: int, timeout: float) -> Any:
        message = self.value.send(x)
        return message.get_result(backend=self.backend, block=True, timeout=int(timeout * 1000))


SIDES: dict[str, type[Side]] = {
    cls.name: cls
    for cls in (MqtasksSide, MqtasksNoBackendSide, MqtasksClassicSide, CelerySide, DramatiqSide)
}


# -- the phases -----------------------------------------------------------------------------


def measure_latency(side: Side, rnd: int, log: Callable[[str], None]) -> dict[str, Any]:
    """``--samples`` round trips after ``--warmup``; milliseconds, p50/p95/p99/max."""
    opts = side.ctx.opts
    rng = random.Random(rnd)
    times: list[float] = []
    for k in range(opts.warmup + opts.samples):
        check_stop()
        t0 = time.perf_counter()
        got = side.roundtrip(k, opts.get_timeout)
        dt = time.perf_counter() - t0
        if got != k:
            raise SideError(f"round trip {k} returned {got!r}")
        if k >= opts.warmup:
            times.append(dt * 1000)
        time.sleep(rng.uniform(0.001, 0.005))
    stats = percentiles(times)
    stats["mean"] = statistics.fmean(times)
    log("round trip p50 {p50:.2f} p99 {p99:.2f} ms".format(**stats))
    return {"latency_ms": stats, "latency_samples_ms": [round(t, 4) for t in times]}


def measure_throughput(
    side: Side, variant: str, stores: bool, records: Records, worker: WorkerProcess
) -> dict[str, Any]:
    """Publish ``--tasks`` while the worker runs; the rate until every result is stored."""
    opts = side.ctx.opts
    n = opts.tasks
    ids: list[str] = []
    since = records.sizes()
    shim = SimpleNamespace(ctx=side.ctx, sender=lambda: side.sender(variant, ids))
    cpu0, cmds0 = tree_cpu_s(worker.pid), redis_commands()
    t0, pub_s, errors = publish_threads(shim, n, opts.publishers, THROUGHPUT_BASE)  # type: ignore[arg-type]
    out: dict[str, Any] = {"problems": list(errors), "publish_per_s": n / pub_s if pub_s else None}
    status, _ = wait_count(
        records, since, n, timeout=opts.timeout, stall=opts.stall, alive=worker.alive
    )
    if status != "ok":
        out["problems"].append(f"{variant}: {status}")
        return out
    starts = [r[2] for r in records.read(since) if r[0] >= THROUGHPUT_BASE]
    end = max(starts)
    if stores:
        pending: Sequence[str] = ids
        deadline = time.monotonic() + opts.timeout
        while pending:
            check_stop()
            pending = side.missing(pending)
            if not pending:
                break
            if time.monotonic() > deadline:
                out["problems"].append(f"{variant}: {len(pending)} results not stored")
                return out
            time.sleep(STORED_POLL)
        end = max(end, time.time())
    out["per_s"] = n / (end - t0)
    cpu1, cmds1 = tree_cpu_s(worker.pid), redis_commands()
    out["worker_cpu_us_per_task"] = (cpu1 - cpu0) / n * 1e6
    if cmds0 is not None and cmds1 is not None:
        # The whole server's count: the publishers', the worker's and the backend's.
        out["redis_cmds_per_task"] = (cmds1 - cmds0) / n
    return out


def run_side(side: Side, rnd: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Start ``side``'s worker, run its phases, stop it; its figures for this round."""
    opts = side.ctx.opts
    out: dict[str, Any] = {"broker": side.broker, "system": side.name, "round": rnd}
    problems: list[str] = []
    out["problems"] = problems
    tag = f"{side.broker}-{side.name}-r{rnd}"
    records = Records(os.path.join(side.ctx.run_dir, tag))
    worker = WorkerProcess(
        side.worker_argv(),
        side.worker_env(records.directory),
        os.path.join(side.ctx.run_dir, tag + ".log"),
    )
    try:
        side.probe()
        status, _ = wait_count(
            records, {}, 1, timeout=opts.startup, stall=opts.startup, alive=worker.alive
        )
        if status != "ok":
            raise SideError(f"worker did not start a task: {status}\n{worker.tail()}")
        phases = [p for p in side.phases if p in opts.phase_list]
        if "latency" in phases:
            out.update(measure_latency(side, rnd, log))
        if "throughput" in phases:
            for variant, stores in side.throughput_variants():
                check_stop()
                got = measure_throughput(side, variant, stores, records, worker)
                problems.extend(got.pop("problems"))
                out.setdefault("throughput", {})[variant] = got
                log(
                    f"{variant}: {got.get('per_s', 0):,.0f}/s, worker CPU "
                    f"{got.get('worker_cpu_us_per_task', 0):,.0f} µs/task, Redis commands "
                    f"{got.get('redis_cmds_per_task', 0):.1f}/task"
                )
        if "chord" in phases:
            check_stop()
            got, _, _ = side.chord(10, opts.get_timeout)
            if got != 10:
                raise SideError(f"chord of 10 returned {got!r}")
            got, seconds, made = side.chord(opts.chord_size, opts.timeout)
            if got != opts.chord_size:
                raise SideError(f"chord of {opts.chord_size} returned {got!r}")
            out["chord_s"] = seconds
            out["chord_made_s"] = made
            log(
                f"chord of {opts.chord_size}: get() after {seconds:.3f} s, callback's result "
                f"made after {_fmt(made, '.3f')} s"
            )
    except Exception as exc:  # one system's failure is not the run's
        problems.append(f"{type(exc).__name__}: {exc}")
        out["traceback"] = traceback.format_exc()
    finally:
        out["worker_exit"] = worker.stop(grace=opts.grace)
        if problems:
            out["worker_log_tail"] = worker.tail()
    return out


# -- summary ----------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over ``results`` (one broker's rounds) of every figure."""
    b: dict[str, Any] = {"latency_ms": {}, "throughput": {}, "chord_s": {}, "chord_made_s": {}}
    for r in results:
        if "latency_ms" in r:
            for q in ("p50", "p99"):
                b["latency_ms"].setdefault(r["system"], {}).setdefault(q, []).append(
                    r["latency_ms"][q]
                )
        for variant, got in r.get("throughput", {}).items():
            if "per_s" in got:
                figures = b["throughput"].setdefault(variant, {})
                for key in ("per_s", "worker_cpu_us_per_task", "redis_cmds_per_task"):
                    if got.get(key) is not None:
                        figures.setdefault(key, []).append(got[key])
        for key in ("chord_s", "chord_made_s"):
            if r.get(key) is not None:
                b[key].setdefault(r["system"], []).append(r[key])
    b["latency_ms"] = {
        s: {q: _median(v) for q, v in qs.items()} for s, qs in b["latency_ms"].items()
    }
    b["throughput"] = {
        variant: {k: _median(v) for k, v in figures.items()}
        for variant, figures in b["throughput"].items()
    }
    for key in ("chord_s", "chord_made_s"):
        b[key] = {k: _median(v) for k, v in b[key].items()}
    return b


def summarise(rounds: list[dict[str, Any]], brokers: list[str]) -> dict[str, Any]:
    """Per broker: the medians over rounds of every figure, and each round's own figures."""
    out: dict[str, Any] = {}
    for broker in brokers:
        mine = [r for r in rounds if r["broker"] == broker]
        b = _figures(mine)
        b["per_round"] = [
            _figures([r for r in mine if r["round"] == k])
            for k in sorted({r["round"] for r in mine})
        ]
        out[broker] = b
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


#: The ratios reported: name, target (text), bound and how (``le``/``ge``; None: no target).
Ratio = tuple[str, str, float | None, str]


def _ratios(b: dict[str, Any]) -> list[tuple[Ratio, float | None]]:
    """Each ratio of :data:`Ratio` computed from one set of figures (one round's)."""
    out: list[tuple[Ratio, float | None]] = []
    lat = b["latency_ms"]
    mq = lat.get("mqtasks", {})
    for peer in ("celery", "dramatiq"):
        for q in ("p50", "p99"):
            out.append(
                (
                    (f"round trip {q}, mqtasks / {peer}", "<= 1", 1.0, "le"),
                    _ratio(mq.get(q), lat.get(peer, {}).get(q)),
                )
            )
    tp = {variant: got.get("per_s") for variant, got in b["throughput"].items()}
    with_r = tp.get("mqtasks, results")
    out.append(
        (
            ("throughput, results / no backend", ">= 0.8", 0.8, "ge"),
            _ratio(with_r, tp.get("mqtasks, no backend")),
        )
    )
    out.append(
        (
            ("throughput, results / ignore_result", "(info)", None, ""),
            _ratio(with_r, tp.get("mqtasks, ignore_result")),
        )
    )
    out.append(
        (
            ("throughput, mqtasks / celery", ">= 1.5", 1.5, "ge"),
            _ratio(with_r, tp.get("celery, results")),
        )
    )
    ch, made = b["chord_s"], b["chord_made_s"]
    out.append(
        (
            ("chord until get(), mqtasks / celery", "<= 0.5", 0.5, "le"),
            _ratio(ch.get("mqtasks"), ch.get("celery")),
        )
    )
    out.append(
        (
            ("chord until made, mqtasks / celery", "(info)", None, ""),
            _ratio(made.get("mqtasks"), made.get("celery")),
        )
    )
    return out


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each ratio per broker: its value in each round, their median, and whether it is met.

    A ratio is taken within a round (the two figures minutes apart), then the median over
    rounds: drift between rounds touches both sides of each ratio alike.
    """
    rows: list[dict[str, Any]] = []
    for broker, b in summary.items():
        per_round = [_ratios(fb) for fb in b["per_round"]]
        for i, ((name, wanted, bound, how), _) in enumerate(_ratios(b)):
            values: list[float] = [v for r in per_round if (v := r[i][1]) is not None]
            value = _median(values)
            rows.append(
                {
                    "broker": broker,
                    "ratio": name,
                    "measured": value,
                    "rounds": values,
                    "target": wanted,
                    "met": None if bound is None else _met(value, bound, how),
                }
            )
    return rows


def _met(value: float | None, bound: float, how: str) -> bool | None:
    if value is None:
        return None
    return value <= bound if how == "le" else value >= bound


def _fmt(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``, or n/a right-aligned to the width ``spec`` starts with."""
    if value is not None:
        return format(value, spec)
    width = "".join(c for c in spec.split(".")[0] if c.isdigit())
    return "n/a".rjust(int(width or 0))


def table(summary: dict[str, Any], opts: argparse.Namespace) -> str:
    lines: list[str] = []
    lines.append(f"round trip delay().get(), ms ({opts.samples} samples, median of rounds)")
    lines.append(f"{'broker':7} {'system':16} {'p50':>8} {'p99':>8}")
    for broker, b in summary.items():
        for system in ("mqtasks", "mqtasks-classic", "celery", "dramatiq"):
            got = b["latency_ms"].get(system)
            if got:
                lines.append(
                    f"{broker:7} {system:16} {_fmt(got['p50'], '8.2f')} {_fmt(got['p99'], '8.2f')}"
                )
    lines.append("")
    lines.append(
        f"throughput, {opts.tasks} tasks from {opts.publishers} publisher threads, "
        "end to end until every result is stored, tasks/s"
    )
    lines.append(
        f"{'broker':7} {'variant':24} {'tasks/s':>9} {'worker CPU µs/task':>19} "
        f"{'Redis cmds/task':>16}"
    )
    for broker, b in summary.items():
        for variant, got in b["throughput"].items():
            lines.append(
                f"{broker:7} {variant:24} {_fmt(got.get('per_s'), '9,.0f')} "
                f"{_fmt(got.get('worker_cpu_us_per_task'), '19,.0f')} "
                f"{_fmt(got.get('redis_cmds_per_task'), '16.1f')}"
            )
    lines.append("")
    lines.append(
        f"chord of {opts.chord_size} no-op members: seconds from delay() until get() returns "
        "the callback's value, and until the callback's result was made"
    )
    lines.append(f"{'broker':7} {'system':10} {'get()':>8} {'made':>8}")
    for broker, b in summary.items():
        for system, seconds in b["chord_s"].items():
            made = b["chord_made_s"].get(system)
            lines.append(f"{broker:7} {system:10} {_fmt(seconds, '8.3f')} {_fmt(made, '8.3f')}")
    lines.append("")
    lines += target_lines(targets(summary))
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.results",
        description="Results and workflows: mqtasks against Celery and Dramatiq, results in Redis.",
    )
    p.add_argument("--brokers", default="amqp,redis", help="comma-separated: amqp,redis")
    p.add_argument("--samples", type=int, default=300, help="timed round trips (300)")
    p.add_argument("--warmup", type=int, default=20, help="untimed round trips first (20)")
    p.add_argument("--tasks", type=int, default=5000, help="tasks in the throughput phase (5000)")
    p.add_argument("--publishers", type=int, default=8, help="publisher threads (8)")
    p.add_argument("--chord-size", type=int, default=1000, help="chord members (1000)")
    p.add_argument("--repeat", type=int, default=1, help="rounds; medians reported (1)")
    p.add_argument(
        "--phases", default=",".join(PHASES), help="comma-separated: latency,throughput,chord"
    )
    p.add_argument(
        "--systems", default=",".join(SIDES), help=f"comma-separated, from {','.join(SIDES)}"
    )
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per phase (120)")
    p.add_argument("--get-timeout", type=float, default=10.0, help="seconds per get() (10)")
    add_worker_options(p)
    opts = p.parse_args(argv)
    opts.broker_list = [b.strip() for b in opts.brokers.split(",") if b.strip()]
    opts.phase_list = [s.strip() for s in opts.phases.split(",") if s.strip()]
    opts.system_list = [s.strip() for s in opts.systems.split(",") if s.strip()]
    bad = [b for b in opts.broker_list if b not in BROKERS]
    bad += [s for s in opts.phase_list if s not in PHASES]
    bad += [s for s in opts.system_list if s not in SIDES]
    if bad:
        p.error(f"unknown broker(s)/phase(s)/system(s) {bad}")
    if min(opts.samples, opts.tasks, opts.publishers, opts.chord_size, opts.repeat) < 1:
        p.error("--samples, --tasks, --publishers, --chord-size and --repeat must be at least 1")
    for url in [*BROKERS.values(), BACKEND_URL]:
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            p.error("refusing a non-loopback broker")
    return opts


@contextlib.contextmanager
def _side(side: Side) -> Iterator[Side]:
    try:
        side.setup()
        yield side
    finally:
        try:
            side.close()
        except Exception as exc:
            print(f"warning: closing {side.name} on {side.broker}: {exc!r}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # Publishers log at warning and above, as the workers do (--log-level warning).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    run_id = uuid.uuid4().hex[:8]
    run_dir = os.path.join(HERE, "results", f"run-{run_id}")
    os.makedirs(run_dir, exist_ok=True)
    ctx = Context(run_id, run_dir, opts)
    info, header = run_header(("celery", "dramatiq"))
    print(header)
    print(
        f"run {run_id}: {opts.samples} round trips, {opts.tasks} tasks from {opts.publishers} "
        f"threads, chord of {opts.chord_size}, {opts.repeat} round(s); systems "
        f"{','.join(opts.system_list)}; phases {','.join(opts.phase_list)}",
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
                for name in opts.system_list[k:] + opts.system_list[:k]:
                    if broker != "amqp" and SIDES[name].amqp_only:
                        continue
                    check_stop()
                    with _side(SIDES[name](broker, ctx)) as side:
                        configs.setdefault(broker, {})[name] = side.config
                        measure(
                            rounds,
                            rnd,
                            broker,
                            name,
                            lambda log, s=side, r=rnd: run_side(s, r, log),
                        )
                    check_stop()
    except KeyboardInterrupt:
        print("interrupted; stopping workers and deleting queues and keys", file=sys.stderr)
        status = 130
    except Exception as exc:
        traceback.print_exc()
        print(f"failed: {exc!r}", file=sys.stderr)
        status = 1
    finally:
        # Finish the cleanup, whatever signal comes.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cleanup(ctx)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    wall = time.monotonic() - started
    summary = summarise(rounds, opts.broker_list)
    print()
    print(f"{header}\nwall time {wall / 60:.1f} min\n")
    print(table(summary, opts))
    print("\nConfigurations:")
    print_configs(configs)
    if opts.json:
        doc = {
            "run_id": run_id,
            "machine": info,
            "options": {k: v for k, v in vars(opts).items() if k != "json"},
            "wall_seconds": round(wall, 1),
            "configs": configs,
            "summary": summary,
            "targets": targets(summary),
            "rounds": rounds,
        }
        write_json(opts.json, doc)
    if opts.keep or status or any(r["problems"] for r in rounds):
        print(f"records and worker logs kept in {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    if any(r["problems"] for r in rounds) and status == 0:
        status = 2
    return status


def cleanup(ctx: Context) -> None:
    """Stop every worker, delete the run's queues (RabbitMQ) and keys (both Redis databases)."""
    for w in list(WorkerProcess.live):
        w.stop(grace=2.0)
    if "amqp" in ctx.opts.broker_list:
        _cleanup_amqp(ctx)
    prefix = f"bench-{ctx.run_id}"
    _sweep_redis(BROKERS["redis"], prefix)
    _sweep_redis(BACKEND_URL, prefix)


if __name__ == "__main__":
    sys.exit(main())
