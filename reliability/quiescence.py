"""Quiescence over several queues: the scenarios whose work spreads beyond the run's queue.

:meth:`Run.wait_quiescent <reliability.run.Run.wait_quiescent>` watches the
run's one work queue. Events (S17) land in a queue per subscriber group and
ordered tasks (S18) in a queue per partition; :func:`wait_quiescent` applies the
same rule to every queue whose name starts with the run's queue: nothing ready,
delayed or unacked, and the ledger and the dead-letter queues unchanged for the
profile's quiet seconds. :func:`unacked_holders` says who holds what is left
when a run never gets there.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .run import Run

__all__ = ["depths", "unacked_holders", "wait_quiescent"]

#: The dead-letter queue's suffix (``QueueSpec`` declares ``<name>.dlq`` for every queue).
DEAD_SUFFIX = ".dlq"


def depths(run: Run) -> dict[str, int]:
    """Messages of the run's queues (every name starting with ``run.queue``) not yet
    finished, by place: ready, delayed, unacked, dead."""
    base = run.queue
    if run.is_redis:
        server = run.harness.redis_server(run.broker)  # type: ignore[arg-type]
        client = server.client()
        try:
            p = run.key_prefix
            ready = dead = delayed = 0
            # Every key below is the run's: the prefix is the run's own.
            for key in client.scan_iter(match=f"{p}:q:{base}*", count=1000):
                name = key.decode(errors="replace")
                if name.endswith(DEAD_SUFFIX):
                    dead += int(client.llen(key))
                else:
                    ready += int(client.llen(key))
            for key in client.scan_iter(match=f"{p}:delayed:*", count=1000):
                delayed += int(client.zcard(key))
            unacked = sum(int(client.llen(k)) for k in client.scan_iter(match=f"{p}:proc:*"))
        finally:
            client.close()
        return {"ready": ready, "delayed": delayed, "unacked": unacked, "dead": dead}
    ready = unacked = delayed = dead = 0
    for name, (r, u) in run.harness.rabbit_node().queue_depths().items():
        if name.startswith(base) and name.endswith(DEAD_SUFFIX):
            dead += r + u
        elif name.startswith(base):
            ready += r
            unacked += u
        elif name.startswith("mqtasks.delay."):
            delayed += r + u
    return {"ready": ready, "delayed": delayed, "unacked": unacked, "dead": dead}


def wait_quiescent(run: Run, timeout: float, *, quiet: float | None = None) -> bool:
    """:meth:`Run.wait_quiescent <reliability.run.Run.wait_quiescent>` over every queue
    of the run (:func:`depths`), once its publishers have finished; False after ``timeout``.

    Recorded as the check ``quiescent``; a run that never gets there also records who
    holds the messages left unacknowledged (``unacked_holders``) and the worker pids.
    """
    run.depths = lambda: depths(run)  # type: ignore[method-assign]
    ok = run.wait_quiescent(timeout, quiet=quiet)
    run.check("quiescent", ok, ok, f"queues empty, ledger quiet within {timeout:.0f} s")
    if not ok:
        run.extra["unacked_holders"] = unacked_holders(run)
        run.extra["worker_pids"] = run.pool.pids()
    return ok


def unacked_holders(run: Run) -> list[dict[str, object]]:
    """Who holds unacknowledged messages now: on RabbitMQ each channel with some (its
    client's port and process, by ``ss``), on Redis each in-flight list of the run.

    A diagnostic for a run that is not quiescent: messages a live consumer holds
    without running them show here, with the process that holds them.
    """
    if run.is_redis:
        client = run.harness.redis_server(run.broker).client()  # type: ignore[arg-type]
        try:
            return [
                {"list": k.decode(errors="replace"), "messages": int(client.llen(k))}
                for k in client.scan_iter(match=f"{run.key_prefix}:proc:*")
                if client.llen(k)
            ]
        finally:
            client.close()
    out = run.harness.rabbit_node().ctl(
        "list_channels", "-q", "--no-table-headers", "name", "messages_unacknowledged",
        "consumer_count", "prefetch_count", timeout=30,
    )  # fmt: skip
    pids = _pids_by_port()
    holders: list[dict[str, object]] = []
    for line in out.splitlines():
        # "127.0.0.1:54321 -> 127.0.0.1:5672 (1)  4  3  4"
        parts = line.split()
        if len(parts) < 7 or not parts[-3].isdigit() or int(parts[-3]) == 0:
            continue
        port = parts[0].rsplit(":", 1)[-1]
        holders.append(
            {
                "channel": " ".join(parts[:-3]),
                "unacked": int(parts[-3]),
                "consumers": int(parts[-2]),
                "prefetch": int(parts[-1]),
                "pid": pids.get(port),
            }
        )
    return holders


def _pids_by_port() -> dict[str, int]:
    """Local TCP port -> pid of the process owning the socket (``ss -tnp``)."""
    try:
        out = subprocess.run(
            ["ss", "-tnpH"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 6 or "pid=" not in parts[-1]:
            continue
        port = parts[3].rsplit(":", 1)[-1]
        pid = parts[-1].split("pid=", 1)[1].split(",", 1)[0]
        if pid.isdigit():
            found[port] = int(pid)
    return found
