"""Worker processes of the benchmark suite: what they report (their record files), their
process trees, peak RSS and CPU time."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable

from ._record import RECORD, read_records

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
