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

The benchmark scripts also share here how they record a measurement (:func:`measure`:
timed, its problems logged, a failure kept as a problem) and how they print their
targets (:func:`target_row`, :func:`target_lines`).
"""

from __future__ import annotations

import os
import statistics
import struct
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "RECORD",
    "Log",
    "add_result_tasks",
    "measure",
    "read_records",
    "record",
    "results_app_env",
    "target_lines",
    "target_row",
]

#: How a measurement reports progress: one line, printed under its round's prefix.
Log = Callable[[str], None]

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


def measure(
    rounds: list[dict[str, Any]],
    rnd: int,
    broker: str,
    name: str,
    run: Callable[[Log], dict[str, Any]],
    *,
    kind: str = "system",
) -> dict[str, Any]:
    """Run one measurement: ``run(log)``, its lines prefixed ``[r<round> <broker> <name>]``.

    Its seconds are added to the result, which is appended to ``rounds``, and its
    problems are printed. An exception from ``run`` is the measurement's problem, not
    the run's: the result is then ``{"broker", kind: name, "round", "problems"}``.
    """
    prefix = f"[r{rnd + 1} {broker} {name}]"

    def log(msg: str) -> None:
        print(f"  {prefix} {msg}", flush=True)

    t = time.monotonic()
    try:
        result = run(log)
    except Exception as exc:  # one measurement's failure is not the run's
        result = {"broker": broker, kind: name, "round": rnd, "problems": [f"failed: {exc!r}"]}
    result["seconds"] = round(time.monotonic() - t, 1)
    rounds.append(result)
    for problem in result["problems"]:
        log(f"PROBLEM: {problem}")
    return result


def target_row(
    broker: str, ratio: str, values: list[float], target: str, bound: float | None, how: str
) -> dict[str, Any]:
    """One row of a targets table: a ratio's value in each round, their median, and whether
    it meets ``bound`` (``how``: ``ge`` at least, ``le`` at most; None: for information)."""
    value = statistics.median(values) if values else None
    met = None
    if bound is not None and value is not None:
        met = value <= bound if how == "le" else value >= bound
    return {
        "broker": broker,
        "ratio": ratio,
        "measured": value,
        "rounds": values,
        "target": target,
        "met": met,
    }


def target_lines(rows: list[dict[str, Any]], width: int = 38) -> list[str]:
    """The targets table of ``rows`` (:func:`target_row`), under its heading."""
    lines = [
        "targets: ratios within each round, their median",
        f"{'broker':7} {'ratio':{width}} {'median':>8}  {'target':8} {'met':4} rounds",
    ]
    for row in rows:
        met, value = row["met"], row["measured"]
        mark = "-" if met is None else ("yes" if met else "NO")
        median = "n/a".rjust(8) if value is None else f"{value:8.2f}"
        each = " ".join(f"{v:.2f}" for v in row["rounds"])
        lines.append(
            f"{row['broker']:7} {row['ratio']:{width}} {median}  {row['target']:8} {mark:4} {each}"
        )
    return lines
