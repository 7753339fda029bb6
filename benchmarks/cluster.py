"""Pipeline throughput on a 3-node RabbitMQ cluster: quorum queues replicated on
3 nodes against the same queue on 1 node, in the same run.

It starts its own cluster (three nodes on loopback ports of their own, see
``reliability.rabbit_cluster``), runs the pipeline phase of
``benchmarks.throughput`` (publisher threads and a worker at once, end to end)
on a quorum queue with ``QueueSpec(replicas=1)`` and with ``replicas=3``,
alternating, and reports each rate and their ratio. The app connects through
the failover list of the three nodes. The cluster is always stopped.

Run ``python -m benchmarks.cluster --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import uuid
from dataclasses import asdict
from typing import Any

from mqtasks import QueueSpec

from .throughput import Measurement, MqtasksSide, machine_info


def measure(url: str, replicas: int, n: int, opts: argparse.Namespace) -> Measurement:
    """One pipeline measurement of ``n`` no-op tasks on a queue replicated ``replicas`` times."""
    run = uuid.uuid4().hex[:8]
    queue = f"bench-{run}-cluster-r{replicas}"
    side = MqtasksSide(url, queue, f"{queue}-warm", opts)
    for name in (queue, f"{queue}-warm"):
        side.app.queues[name] = QueueSpec(name, queue_type="quorum", replicas=replicas)
    try:
        side.setup()
        m = side.pipeline(f"cluster-r{replicas}", n)
    finally:
        side.cleanup()
    return m


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__)
    p.add_argument("--tasks", type=int, default=5000, help="tasks per measurement (5000)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of both measurements (1)")
    p.add_argument("--concurrency", type=int, default=8, help="worker threads (8)")
    p.add_argument("--prefetch", type=int, default=None, help="prefetch (2 x concurrency)")
    p.add_argument("--publishers", type=int, default=2, help="publisher threads (2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per phase (300)")
    p.add_argument("--stall", type=float, default=20.0, help="seconds without progress (20)")
    p.add_argument("--json", default=None, help="also write the results here")
    opts = p.parse_args(argv)
    if opts.prefetch is None:
        opts.prefetch = 2 * opts.concurrency
    return opts


def main(argv: list[str] | None = None) -> int:
    from reliability.rabbit_cluster import RabbitCluster

    opts = parse_args(argv)
    cluster = RabbitCluster()
    results: list[Measurement] = []
    try:
        started = cluster.start()
        print(f"cluster of {len(cluster.nodes)} nodes started in {started:.0f} s", flush=True)
        for i in range(opts.repeat):
            # Alternate the order so that drift affects both sides alike.
            for replicas in (1, 3) if i % 2 == 0 else (3, 1):
                m = measure(cluster.url, replicas, opts.tasks, opts)
                results.append(m)
                print(
                    f"  replicas={replicas}: {m.tasks} tasks in {m.seconds:.2f} s = "
                    f"{m.rate:.0f}/s ({m.status})",
                    flush=True,
                )
        version = cluster.version()
    finally:
        cluster.stop()
    rates: dict[int, float] = {}
    for replicas in (1, 3):
        mine = [m.rate for m in results if m.broker == f"cluster-r{replicas}"]
        rates[replicas] = statistics.median(mine)
    ratio = rates[3] / rates[1]
    print(
        f"pipeline, quorum queue on 3 nodes / on 1 node: {rates[3]:.0f}/s / {rates[1]:.0f}/s "
        f"= {ratio:.2f}"
    )
    if opts.json:
        out: dict[str, Any] = {
            "machine": machine_info(),
            "rabbitmq": version,
            "options": vars(opts),
            "rates": rates,
            "ratio_3_to_1": round(ratio, 3),
            "measurements": [asdict(m) for m in results],
        }
        with open(opts.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0 if all(m.status == "ok" for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
