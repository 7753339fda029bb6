"""Memory of a multi-process worker: ``mqtasks worker --processes 2`` against ``dramatiq -p 2``.

Both run the same no-op task (``benchmarks/bench_mqtasks_app.py``,
``benchmarks/bench_dramatiq_app.py``) on the local RabbitMQ, with the same shape: two
worker processes of eight threads each. For each system, in one run:

1. start the worker command (its own process group) and wait until both processes
   consume (two consumers on the queue);
2. **idle**: sum RSS and PSS over the whole process tree (supervisor and children),
   read from ``/proc/<pid>/smaps_rollup``;
3. publish ``--tasks`` tasks with the system's own client and sample the tree every
   few milliseconds while they run: **peak** is the largest sum seen;
4. **after**: the sums once every task has run;
5. with ``--replace`` (mqtasks only: Dramatiq stops when a child dies), SIGKILL one
   child, wait until its replacement consumes, and sum again (**replaced**): the
   supervisor starts a replacement as a new interpreter, whose pages are its own.

PSS divides each shared page among the processes mapping it, so it is the tree's
real share of the machine's memory; RSS counts a shared page once per process.
The ratio mqtasks / Dramatiq is taken from figures measured in the same run.
Every process started is stopped and every queue declared is deleted at the end.

Run ``python -m benchmarks.memory --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

import kombu

from mqtasks.transport.queue import DLQ_SUFFIX

from ._systems import Context, DramatiqSystem, MqtasksSystem, System
from ._workers import Records, WorkerProcess, tree
from .suite import _cleanup_amqp
from .throughput import BROKERS

#: Seconds between two samples of the process tree while tasks run.
SAMPLE = 0.02


def smaps_mib(pid: int) -> tuple[float, float]:
    """``(rss, pss)`` of one process in MiB, from ``/proc/<pid>/smaps_rollup``."""
    rss = pss = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss / 1024, pss / 1024


def tree_memory(pid: int) -> tuple[float, float, int]:
    """``(rss, pss, processes)`` summed over the process tree rooted at ``pid``."""
    pids = tree(pid)
    figures = [smaps_mib(p) for p in pids]
    return sum(r for r, _ in figures), sum(p for _, p in figures), len(pids)


def consumers(queue: str) -> int:
    """Consumers of ``queue`` on the local RabbitMQ (0 when it does not exist yet)."""
    with kombu.Connection(BROKERS["amqp"], connect_timeout=5) as conn:
        try:
            _, _, count = conn.channel().queue_declare(queue, passive=True)
        except Exception:  # not declared yet: the worker is still starting
            return 0
        return int(count)


def wait(cond: Callable[[], bool], timeout: float, what: str, proc: WorkerProcess) -> None:
    """Poll ``cond`` until it holds; raise with the worker's last lines after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if not proc.alive():
            raise RuntimeError(f"the worker exited while waiting for {what}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s\n{proc.tail()}")
        time.sleep(0.05)


def measure(
    system: System, argv: list[str], tasks: int, run_dir: str, replace: bool = False
) -> dict[str, float]:
    """Start ``argv`` for ``system``, run ``tasks`` tasks through it, return its figures.

    With ``replace``, also the figures once a child killed afterwards has been replaced.
    """
    record_dir = os.path.join(run_dir, system.name)
    os.makedirs(record_dir)
    records = Records(record_dir)
    system.setup()
    proc = WorkerProcess(
        argv, system.worker_env(record_dir), os.path.join(run_dir, f"{system.name}.log")
    )
    try:
        wait(lambda: consumers(system.queue) >= 2, 60, "two consumers", proc)
        # Both processes consume; let the last imports and connections settle.
        wait(lambda: tree_memory(proc.pid)[2] >= 3, 30, "the process tree", proc)
        time.sleep(1.0)
        idle_rss, idle_pss, n = tree_memory(proc.pid)
        send, close = system.sender()
        try:
            for seq in range(tasks):
                send(seq, time.time())
        finally:
            close()
        peak_rss, peak_pss = idle_rss, idle_pss
        deadline = time.monotonic() + 120
        while records.count() < tasks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{records.count()} of {tasks} tasks ran\n{proc.tail()}")
            rss, pss, _ = tree_memory(proc.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(SAMPLE)
        after_rss, after_pss, _ = tree_memory(proc.pid)
        replaced: dict[str, float] = {}
        if replace:
            victim = max(p for p in tree(proc.pid) if p != proc.pid)
            os.kill(victim, signal.SIGKILL)
            wait(lambda: victim not in tree(proc.pid), 30, "the killed child to go", proc)
            wait(lambda: consumers(system.queue) >= 2, 60, "the replacement to consume", proc)
            time.sleep(1.0)
            replaced["replaced_rss"], replaced["replaced_pss"], _ = tree_memory(proc.pid)
        return {
            **replaced,
            "processes": n,
            "idle_rss": idle_rss,
            "idle_pss": idle_pss,
            "peak_rss": max(peak_rss, after_rss),
            "peak_pss": max(peak_pss, after_pss),
            "after_rss": after_rss,
            "after_pss": after_pss,
        }
    finally:
        proc.stop()
        system.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("--tasks", type=int, default=500, help="tasks per system (500)")
    parser.add_argument(
        "--replace",
        action="store_true",
        help="then kill one mqtasks child and measure again once its replacement consumes",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    run_id = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as run_dir:
        ctx = Context(run_id=run_id, run_dir=run_dir, opts=opts)
        mqtasks = MqtasksSystem("amqp", ctx)
        dramatiq = DramatiqSystem("amqp", ctx)
        mq_argv = [
            *mqtasks.worker_argv(), "--processes", "2", "-Q", mqtasks.queue,
        ]  # fmt: skip
        results: dict[str, dict[str, float]] = {}
        try:
            results["mqtasks"] = measure(mqtasks, mq_argv, opts.tasks, run_dir, opts.replace)
            results["dramatiq"] = measure(dramatiq, dramatiq.worker_argv(), opts.tasks, run_dir)
        finally:
            for proc in list(WorkerProcess.live):
                proc.stop()
            # mqtasks' dead-letter queue and Dramatiq's delay and dead-letter queues too.
            ctx.amqp_queues.add(mqtasks.queue + DLQ_SUFFIX)
            _cleanup_amqp(ctx)
    keys = ["idle_rss", "idle_pss", "peak_rss", "peak_pss", "after_rss", "after_pss"]
    print(f"{opts.tasks} no-op tasks, 2 processes x 8 threads, RabbitMQ; MiB summed over the tree")
    print(f"{'':10}" + "".join(f"{k:>11}" for k in keys) + "  processes")
    for name, fig in results.items():
        cells = "".join(f"{fig[k]:11.1f}" for k in keys)
        print(f"{name:10}{cells}  {int(fig['processes'])}")
    ratio = "".join(f"{results['mqtasks'][k] / results['dramatiq'][k]:11.2f}" for k in keys)
    print(f"{'ratio':10}{ratio}")
    if opts.replace:
        fig = results["mqtasks"]
        print(
            f"mqtasks after one child was replaced: RSS {fig['replaced_rss']:.1f}, "
            f"PSS {fig['replaced_pss']:.1f} (ratio to Dramatiq after: "
            f"{fig['replaced_rss'] / results['dramatiq']['after_rss']:.2f}, "
            f"{fig['replaced_pss'] / results['dramatiq']['after_pss']:.2f})"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
