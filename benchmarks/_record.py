"""What every benchmark task does: note its start time, cheaply, for the suite to read.

All four systems (mqtasks, Celery, Dramatiq, plain kombu) run the same task body::

    def noop(seq: int, sent: float) -> None:
        record(seq, sent)

``record`` takes the wall-clock start time first, then appends one fixed-size binary
record (``seq``, ``sent``, ``start``: 24 bytes) with a single ``os.write`` to a file of
its own process, opened with ``O_APPEND`` in ``$BENCH_RECORD_DIR``. One ``time.time()``,
one ``struct.pack`` and one ``write(2)`` per task: a few microseconds, the same for every
system, and no broker, socket or lock involved. Threads of a process share the file
descriptor; a single small ``O_APPEND`` write is not interleaved with another on Linux.
The suite counts finished tasks by the files' sizes and reads the records afterwards.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Any

__all__ = ["RECORD", "add_result_tasks", "read_records", "record", "results_app_env"]

#: seq (int64), sent (float64, publisher's time.time()), start (float64, task's time.time()).
RECORD = struct.Struct("<qdd")

_fd: int | None = None
_pack = RECORD.pack


def _open() -> int:
    global _fd
    directory = os.environ["BENCH_RECORD_DIR"]
    path = os.path.join(directory, f"{os.getpid()}.rec")
    _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    return _fd


def _forget() -> None:  # a forked child (Celery prefork, Dramatiq) writes its own file
    global _fd
    _fd = None


os.register_at_fork(after_in_child=_forget)


def record(seq: int, sent: float) -> None:
    """Record that task ``seq``, sent at ``sent`` (publisher's wall time), starts now."""
    start = time.time()
    fd = _fd if _fd is not None else _open()
    os.write(fd, _pack(seq, sent, start))


def read_records(
    directory: str, offsets: dict[str, int] | None = None
) -> list[tuple[int, float, float]]:
    """All records in ``directory``, skipping the first ``offsets[name]`` bytes of each file."""
    out: list[tuple[int, float, float]] = []
    offsets = offsets or {}
    size = RECORD.size
    for name in os.listdir(directory):
        if not name.endswith(".rec"):
            continue
        with open(os.path.join(directory, name), "rb") as fh:
            fh.seek(offsets.get(name, 0))
            data = fh.read()
        usable = len(data) - len(data) % size
        out.extend(RECORD.iter_unpack(data[:usable]))
    return out


def add_result_tasks(app: Any) -> None:
    """Register the result benchmark's tasks on ``app`` (Celery or mqtasks: ``app.task(name=)``).

    ``bench.value(x) -> x`` (round trips, chord members), ``bench.tally(values) ->
    len(values)`` (chord callback) and ``bench.rnoop(seq, sent) -> seq``, which records its
    start like the suite's no-op and returns a small value.
    """

    @app.task(name="bench.value")  # type: ignore[untyped-decorator]
    def value(x: Any) -> Any:
        return x

    @app.task(name="bench.tally")  # type: ignore[untyped-decorator]
    def tally(values: list[Any]) -> int:
        return len(values)

    @app.task(name="bench.rnoop")  # type: ignore[untyped-decorator]
    def rnoop(seq: int, sent: float) -> int:
        record(seq, sent)
        return seq


def results_app_env(backend_url: str, backend_prefix: str) -> dict[str, str]:
    """A result benchmark app's settings from the environment (set by ``benchmarks.results``).

    ``url``, ``queue``, ``backend_url``, ``backend_prefix`` and ``keyprefix``, from
    ``BENCH_BROKER_URL``, ``BENCH_QUEUE``, ``BENCH_BACKEND_URL``, ``BENCH_BACKEND_PREFIX``
    and ``BENCH_KEYPREFIX``; ``backend_url`` and ``backend_prefix`` are the defaults of the two.
    """
    env = os.environ
    return {
        "url": env.get("BENCH_BROKER_URL", "memory://"),
        "queue": env.get("BENCH_QUEUE", "bench"),
        "backend_url": env.get("BENCH_BACKEND_URL", backend_url),
        "backend_prefix": env.get("BENCH_BACKEND_PREFIX", backend_prefix),
        "keyprefix": env.get("BENCH_KEYPREFIX", ""),
    }
