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
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import kombu
import structlog

from ._record import measure
from ._summary import markdown, summarise
from ._systems import (
    AMQP_ONLY,
    SYSTEMS,
    Context,
    KombuSystem,
    MqtasksSystem,
    System,
    add_worker_options,
)

# Re-exported: the benchmarks written against the suite before it was split import these here.
from ._systems import mqtasks_worker_argv as mqtasks_worker_argv
from ._workers import (
    HERE,
    POLL_FINE,
    Records,
    WorkerProcess,
    percentiles,
    tree_cpu_s,
    tree_hwm_mib,
    wait_count,
)
from .throughput import BROKERS, _sweep_redis, machine_info, peak_rss_mib, split

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
