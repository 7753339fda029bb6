"""The life of worker processes: signals, exit codes and the ``--processes`` supervisor.

The command line (:mod:`mqtasks.cli`) parses options and loads the app; this
module decides what a signal means to a running worker, which exit code a stop
ends with, and how N worker processes are kept running. It knows nothing of
click, so a program that builds its own :class:`~mqtasks.worker.Worker` (the
reliability harness does) can stop it the same way ``mqtasks worker`` does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any

import structlog

from . import logging as logs
from .config import mask_url
from .exceptions import MQTasksError

if TYPE_CHECKING:
    from .worker import Worker

__all__ = [
    "MMAP_THRESHOLD",
    "RET_ERROR",
    "RET_FORCED",
    "RET_OK",
    "RET_TIMEOUT",
    "StopSignals",
    "Supervisor",
    "return_large_buffers_to_the_os",
    "run_worker",
]

#: Exit code: stopped cleanly.
RET_OK = 0
#: Exit code: could not start (import, configuration or connection error).
RET_ERROR = 1
#: Exit code: the shutdown grace period ran out; unfinished tasks go back to the broker.
RET_TIMEOUT = 3
#: Exit code: a second signal forced an immediate exit.
RET_FORCED = 4

logger = structlog.get_logger("mqtasks.process")

#: Allocations from this size up get pages of their own (see
#: :func:`return_large_buffers_to_the_os`).
MMAP_THRESHOLD = 1024 * 1024

#: glibc's mallopt() parameter M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3


def return_large_buffers_to_the_os() -> None:
    """Fix glibc's mmap threshold, so a worker's memory goes back after a large message.

    glibc raises its threshold to the size of the last large block freed (up to
    32 MiB), so after one large message every later one comes from the heap and
    the pages stay with the process: a worker that has seen a few large messages
    keeps their pages, where one that maps them gives them back. A fixed
    threshold turns that off. No library does this; it is a no-op where malloc
    is not glibc's, and ``MALLOC_MMAP_THRESHOLD_`` in the environment still wins.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


class StopSignals:
    """SIGTERM and SIGINT handling of a worker process; installed when created.

    The first signal asks the worker to stop (see :func:`run_worker`); a second
    one exits at once with code 4. Under ``--processes`` the supervisor's pid is
    in ``MQTASKS_SUPERVISOR_PID``: the child then ignores SIGINT (Ctrl-C reaches
    the whole process group, and the supervisor turns it into one SIGTERM per
    child). Create it before anything slow (loading the app), so that a signal
    that comes early is a clean stop too.
    """

    def __init__(self) -> None:
        #: Set by the first signal.
        self.stop = threading.Event()
        self.count = 0
        #: The supervisor's pid, when this process is one of its children.
        self.supervisor = os.environ.get("MQTASKS_SUPERVISOR_PID")
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN if self.supervisor else self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            logger.warning("worker.forced_exit", signal=signal.Signals(signum).name)
            logs.flush()  # os._exit skips the atexit hook that writes the last lines
            os._exit(RET_FORCED)
        logger.info("worker.stopping", signal=signal.Signals(signum).name)
        self.stop.set()


def run_worker(w: Worker, signals: StopSignals | None = None) -> int:
    """Run ``w`` until a signal; return the exit code.

    Args:
        w: The worker, not started yet.
        signals: Handlers installed earlier (:class:`StopSignals`); installed
            here if None. A signal that came already stops the worker before it
            connects, with exit code 0.

    Under ``--processes`` the child also stops by itself if the supervisor disappears.
    """
    if signals is None:
        signals = StopSignals()
    stop, supervisor = signals.stop, signals.supervisor
    if stop.is_set():
        logger.info("worker.stopped", clean=True, note="stopped before it started")
        return RET_OK
    try:
        w.start()
    except MQTasksError as exc:
        logger.error(
            "worker.start_failed", error=str(exc), broker=mask_url(w.app.settings.broker_url)
        )
        return RET_ERROR
    while not stop.wait(0.5):
        if w.join(0):  # the I/O thread ended on its own
            return RET_ERROR
        if supervisor and str(os.getppid()) != supervisor:
            logger.warning("worker.orphaned", supervisor=supervisor)
            break
    return RET_OK if w.stop() else RET_TIMEOUT


class Supervisor:
    """Runs N worker processes, replaces those that die, and stops them on a signal.

    Args:
        argv: Command line of one child worker.
        processes: How many children to keep running.
    """

    def __init__(self, argv: list[str], processes: int) -> None:
        self.argv = argv
        self.processes = processes
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.signals = 0
        self._restarts: list[float] = []

    def _spawn(self, slot: int) -> None:
        env = {
            **os.environ,
            "MQTASKS_WORKER_SLOT": str(slot),
            "MQTASKS_SUPERVISOR_PID": str(os.getpid()),
        }
        child = subprocess.Popen(self.argv, env=env)
        self.children[slot] = child
        logger.info("supervisor.child_started", slot=slot, pid=child.pid)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Children ignore SIGINT; each signal here becomes one SIGTERM per child
        # (first: drain, second: force), and a third one kills them.
        self.signals += 1
        self.stopping = True
        sig = signal.SIGKILL if self.signals > 2 else signal.SIGTERM
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(sig)

    def run(self) -> int:
        """Run until signalled; return the worst child exit code."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for slot in range(self.processes):
            self._spawn(slot)
        codes: dict[int, int] = {}
        while True:
            for slot, child in list(self.children.items()):
                code = child.poll()
                if code is None:
                    continue
                if self.stopping:
                    codes[slot] = code
                    del self.children[slot]
                    continue
                logger.warning("supervisor.child_died", slot=slot, pid=child.pid, code=code)
                self._restart_pause()
                if self.stopping:  # a signal came during the pause: no replacement
                    del self.children[slot]
                    continue
                self._spawn(slot)
            if self.stopping and not self.children:
                break
            time.sleep(0.2)
        return max((self._stop_code(c) for c in codes.values()), default=RET_OK)

    def _stop_code(self, code: int) -> int:
        """The exit code a stopped child stands for."""
        if code == -signal.SIGTERM and self.signals == 1:
            # Killed by our first SIGTERM before it installed its handler: it had
            # not started consuming (the handler comes first), so it held nothing.
            return RET_OK
        # Any other death by a signal is not a clean stop.
        return RET_FORCED if code < 0 else code

    def _restart_pause(self) -> None:
        # Back off when children die in a loop (a bad deploy), up to 10 s.
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < 60] + [now]
        pause = min(10.0, 0.1 * 2 ** max(0, len(self._restarts) - 2))
        end = now + pause
        while time.monotonic() < end and not self.stopping:
            time.sleep(0.05)
