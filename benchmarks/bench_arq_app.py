"""arq's side of ``benchmarks.execution``: one no-op ``async def`` job on Redis.

The worker runs it with ``python -m benchmarks.bench_arq_app`` (``arq`` run on the
settings below, logging warnings only, as the other workers do); the environment
sets the Redis URL (``BENCH_BROKER_URL``) and the queue (``BENCH_QUEUE``, a sorted set;
its health-check key is ``<queue>:health-check``). Everything else is arq's default (up
to 10 jobs at once, a poll every 0.5 s when idle, jobs retried after a crash), except two
settings that make it do what the mqtasks worker does: no result kept (``keep_result=0``:
mqtasks stores none without a result backend), and JSON instead of pickle for the job
data. ``BENCH_ARQ_TUNED=1`` also polls every 10 ms instead of 0.5 s and runs up to 100
jobs at once (taskiq's default) instead of 10: arq reads at most 100 jobs a poll, so its
defaults cap a drain near 200 tasks/s. Job ids are given by the publisher (``<queue>:<seq>``), so the job keys
(``arq:job:<id>``...) carry the run's id too and are swept with the run.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

from arq.connections import RedisSettings
from arq.worker import func

from ._record import record


async def noop(ctx: dict[str, Any], seq: int, sent: float) -> None:
    """The suite's no-op."""
    record(seq, sent)


def dumps(data: Any) -> bytes:
    """arq's job data as JSON."""
    return json.dumps(data).encode()


def loads(data: bytes) -> Any:
    """The job data :func:`dumps` wrote."""
    return json.loads(data)


class WorkerSettings:
    """What ``arq`` reads: the job, where it waits, and the two settings above."""

    functions: ClassVar[list[Any]] = [func(noop, name="bench.noop")]
    redis_settings = RedisSettings.from_dsn(
        os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/10")
    )
    queue_name = os.environ.get("BENCH_QUEUE", "bench")
    keep_result = 0
    job_serializer = staticmethod(dumps)
    job_deserializer = staticmethod(loads)
    if os.environ.get("BENCH_ARQ_TUNED") == "1":
        poll_delay = 0.01
        max_jobs = 100


def main() -> None:
    """Run the worker as ``arq`` would, logging warnings only (arq logs every job at info)."""
    import logging

    from arq.worker import run_worker

    logging.basicConfig(level=logging.WARNING)
    run_worker(WorkerSettings)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
