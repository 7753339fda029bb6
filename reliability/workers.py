"""Worker processes under the harness's own supervisor.

Each slot runs one ``python -m mqtasks worker -A reliability.tasks`` process (or
the early-ack variant). A supervisor thread polls every 50 ms and starts a
replacement as soon as a process exits, so a killed worker is back within 1 s.
Every exit is recorded with its time and code.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Exit", "WorkerPool", "proc_stats", "worker_argv"]

#: The repository root: workers import ``reliability.tasks`` from there.
ROOT = Path(__file__).resolve().parents[1]


def proc_stats(pid: int) -> dict[str, float] | None:
    """RSS (MiB), open fds and threads of process ``pid`` from ``/proc``; None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kib = int(fields.get("VmRSS", "0 kB").split()[0])
    return {
        "pid": pid,
        "rss_mib": round(rss_kib / 1024, 2),
        "fds": fds,
        "threads": int(fields.get("Threads", "0").strip()),
    }


def worker_argv(
    *, concurrency: int, prefetch: int, shutdown_timeout: float, early_ack: bool
) -> list[str]:
    """Command line of one worker process."""
    if early_ack:
        return [
            sys.executable, "-m", "reliability.worker", "--early-ack",
            "-c", str(concurrency), "--prefetch", str(prefetch),
            "--shutdown-timeout", str(shutdown_timeout),
        ]  # fmt: skip
    return [
        sys.executable, "-m", "mqtasks", "worker", "-A", "reliability.tasks",
        "-c", str(concurrency), "--prefetch", str(prefetch),
        "--shutdown-timeout", str(shutdown_timeout), "--log-format", "json",
    ]  # fmt: skip


@dataclass(frozen=True)
class Exit:
    """A worker process that exited."""

    slot: int
    pid: int
    code: int
    #: When it exited (epoch seconds, as seen by the supervisor's poll).
    t: float
    #: When its replacement started, if one was started.
    restarted_at: float | None


class WorkerPool:
    """Keeps ``size`` worker processes running until :meth:`stop`.

    Args:
        argv: Command line of one worker.
        env: Its environment (added to the harness's).
        size: Worker processes.
        log_dir: Each process's stderr goes to ``worker-<slot>-<n>.log`` here.
        restart: Replace exited workers (off for scenarios that watch an exit).
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        size: int,
        log_dir: Path,
        *,
        restart: bool = True,
    ) -> None:
        self.argv = argv
        # The workers watch this pid as ``mqtasks worker`` children watch their
        # supervisor: a worker whose harness is gone (killed, or interrupted
        # while the other lane ran) stops by itself instead of reconnecting forever.
        self.env = {
            **os.environ,
            **env,
            "PYTHONPATH": str(ROOT),
            "MQTASKS_SUPERVISOR_PID": str(os.getpid()),
        }
        self.size = size
        self.log_dir = log_dir
        self.restart = restart
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started: list[tuple[float, int, int]] = []  # (t, slot, pid)
        self.exits: list[Exit] = []
        self._spawned = 0
        self._held: set[int] = set()  # slots not to restart until released
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start every worker and the supervisor thread."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for slot in range(self.size):
            self._spawn(slot)
        self._thread = threading.Thread(target=self._supervise, name="rel-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, slot: int) -> None:
        self._spawned += 1
        log = (self.log_dir / f"worker-{slot}-{self._spawned}.log").open("ab")
        proc = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()
        self.procs[slot] = proc
        self.started.append((time.time(), slot, proc.pid))

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                for slot, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    now = time.time()
                    again = self.restart and slot not in self._held and not self._stopping.is_set()
                    if again:
                        self._spawn(slot)
                    else:
                        del self.procs[slot]
                    self.exits.append(Exit(slot, proc.pid, code, now, now if again else None))
            time.sleep(0.05)

    def pids(self) -> dict[int, int]:
        """``{slot: pid}`` of the running workers."""
        with self._lock:
            return {s: p.pid for s, p in self.procs.items() if p.poll() is None}

    def signal(
        self,
        sig: int,
        slot: int | None = None,
        rng: random.Random | None = None,
        among: Collection[int] | None = None,
    ) -> tuple[int, int]:
        """Send ``sig`` to the worker in ``slot`` (a random one by default, of the
        pids in ``among`` if given and any of them runs); return (slot, pid)."""
        with self._lock:
            alive = {s: p for s, p in self.procs.items() if p.poll() is None}
            if not alive:
                raise RuntimeError("no worker process is running")
            if among is not None:
                alive = {s: p for s, p in alive.items() if p.pid in among} or alive
            if slot is None:
                slot = (rng or random).choice(sorted(alive))
            proc = alive[slot]
            proc.send_signal(sig)
            return slot, proc.pid

    def hold(self, slot: int) -> None:
        """Do not replace the worker in ``slot`` when it exits (until :meth:`release`)."""
        with self._lock:
            self._held.add(slot)

    def release(self, slot: int) -> None:
        """Start a worker in ``slot`` again if it is empty, and resume replacing it."""
        with self._lock:
            self._held.discard(slot)
            if slot not in self.procs:
                self._spawn(slot)

    def wait_exit(self, pid: int, timeout: float) -> Exit | None:
        """Wait until process ``pid`` has exited; return its :class:`Exit`, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for e in self.exits:
                    if e.pid == pid:
                        return e
            time.sleep(0.02)
        return None

    def stats(self) -> list[dict[str, float]]:
        """RSS (MiB), open fds and threads of each running worker."""
        out = []
        for pid in self.pids().values():
            sample = proc_stats(pid)
            if sample is not None:
                out.append(sample)
        return out

    def stop(self, timeout: float = 35.0) -> dict[int, int]:
        """SIGTERM every worker, wait up to ``timeout``, then SIGKILL; return exit codes by pid."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2)
        with self._lock:
            procs = list(self.procs.values())
            self.procs = {}
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[int, int] = {}
        for p in procs:
            try:
                codes[p.pid] = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                codes[p.pid] = p.wait()
        return codes

    def logs(self) -> str:
        """Everything the workers wrote to stderr so far."""
        return "\n".join(
            path.read_text(errors="replace") for path in sorted(self.log_dir.glob("worker-*.log"))
        )
