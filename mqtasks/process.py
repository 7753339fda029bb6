"""The life of worker processes: signals, exit codes and the ``--processes`` supervisor.

The command line (:mod:`mqtasks.cli`) parses options and loads the app; this
module decides what a signal means to a running worker, which exit code a stop
ends with, and how N worker processes are kept running. It knows nothing of
click, so a program that builds its own :class:`~mqtasks.worker.Worker` (the
reliability harness does) can stop it the same way ``mqtasks worker`` does.

How the children start. Two designs were weighed: (a) a fork server, where the
supervisor imports the app, connecting to nothing, and ``fork()``s each child,
which then builds its worker and opens its own connections; (b) a supervisor
that imports only the standard library and starts each child as a fresh
interpreter. (a) is the one here. Its children share, copy-on-write, every page
the supervisor filled before forking: the interpreter, mqtasks, kombu and the
app's own modules, which are most of a worker's memory; under (b) each child
imports all of them again into private pages, and only the supervisor gets
smaller. Celery's prefork pool and ``gunicorn --preload`` do the same; Dramatiq
forks from a parent that has not imported the app, so its children share less.
Forking is safe only from a process with one thread and no connection: before
the first child, :func:`fork_blockers` looks for other threads (a StatsD flush
thread, an OpenTelemetry batch span processor started at import) and connected
sockets (an app that published at import); where it finds any, the children
start as fresh interpreters instead, as in (b) but with the app loaded, and the
supervisor logs why. The supervisor logs without a writer thread for the same
reason (``background=False`` in :func:`mqtasks.logging.configure_logging`), and
freezes the collector's generations before forking so that a child's garbage
collection does not copy the pages it shares. A child replaces the supervisor's
signal handlers with :class:`StopSignals` before anything else (the stop signals
are blocked across ``fork()`` until then), configures its own logging, builds
its worker, connects, and exits through ``os._exit`` after the exit hooks, never
returning into the supervisor's stack.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from . import logging as logs
from ._url import redact
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
    "ChildMain",
    "StopSignals",
    "Supervisor",
    "fork_blockers",
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

#: The signals that stop a worker, blocked around ``fork()`` (see :meth:`Supervisor._fork`).
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}

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


def _release_free_heap() -> None:
    """Give the C heap's free pages back to the OS, before forking (glibc's ``malloc_trim``).

    Importing leaves free pages in the heap; each child forked afterwards gets
    them in its resident set too, unused. A no-op where malloc is not glibc's.
    """
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process runs on
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


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


def fork_blockers() -> list[str]:
    """Why this process cannot fork worker children safely; empty when it can.

    A forked child holds a copy of the forking thread only: another thread's
    locks and half-done work would be left as they were in every child (a
    StatsD flush thread, an OpenTelemetry batch span processor started at
    import). And a connection open now would be one socket shared by every
    child, their frames interleaved. Each such thread and connection is a reason.
    """
    main = threading.main_thread()
    reasons = [f"thread {t.name!r} is running" for t in threading.enumerate() if t is not main]
    reasons += [f"a connection to {peer} is open" for peer in _connection_peers()]
    return reasons


def _connection_peers() -> list[str]:
    """Peers of this process's connected stream sockets (standard streams aside)."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc (not Linux): only threads are checked
        return []
    peers = []
    for fd in fds:
        try:
            if fd <= 2 or not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:  # the fd that listed the directory, closed since
            continue
        with sock:
            try:
                peer = sock.getpeername() if sock.type == socket.SOCK_STREAM else None
            except OSError:  # listening, or not connected
                peer = None
        if isinstance(peer, tuple):
            peers.append(f"{peer[0]}:{peer[1]}")
        elif peer:  # a Unix socket with a path (an unnamed one is a pipe, not a broker)
            peers.append(str(peer))
    return peers


#: A forked child's work: given its stop-signal handlers, run a worker and return the exit code.
ChildMain = Callable[[StopSignals], int]


class _Forked:
    """A child made by ``fork()``: the part of :class:`subprocess.Popen` the supervisor uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by a poll this one interrupted (a signal handler's)
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # not reaped yet, so the pid is still this child's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


class Supervisor:
    """Runs N worker processes, replaces those that die, and stops them on a signal.

    Args:
        start: How a child starts: a function that a child forked from this
            process runs (see :data:`ChildMain`), or the command line of a fresh
            interpreter. Fork only from a process :func:`fork_blockers` finds safe.
        processes: How many children to keep running.
        signals: Handlers installed before this supervisor's, while the app was
            loading: a signal they caught stops the supervisor before any child starts.
    """

    def __init__(
        self,
        start: ChildMain | list[str],
        processes: int,
        signals: StopSignals | None = None,
    ) -> None:
        self.start = start
        self.processes = processes
        self.early = signals
        self.children: dict[int, _Forked | subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.signals = 0
        self._restarts: list[float] = []

    def _spawn(self, slot: int) -> None:
        child: _Forked | subprocess.Popen[bytes]
        if isinstance(self.start, list):
            env = {
                **os.environ,
                "MQTASKS_WORKER_SLOT": str(slot),
                "MQTASKS_SUPERVISOR_PID": str(os.getpid()),
            }
            child = subprocess.Popen(self.start, env=env)
        else:
            child = self._fork(slot, self.start)
        self.children[slot] = child
        logger.info("supervisor.child_started", slot=slot, pid=child.pid)

    def _fork(self, slot: int, main: ChildMain) -> _Forked:
        logs.flush()  # a line still buffered would be written by the child too
        # What is imported by now goes to the collector's permanent generation: a
        # collection in a child never writes to those objects' pages, so they stay shared.
        gc.freeze()
        _release_free_heap()
        parent = os.getpid()
        # Blocked until the child has its own handlers: the supervisor's, copied
        # into the child, would signal the child's siblings.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._child(slot, parent, main, mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return _Forked(pid)

    def _child(self, slot: int, parent: int, main: ChildMain, mask: Iterable[int]) -> NoReturn:
        """Run ``main`` in a forked child and exit with its code; never returns."""
        code = RET_ERROR
        try:
            self.children.clear()  # the siblings are not this process's to signal or reap
            os.environ["MQTASKS_WORKER_SLOT"] = str(slot)
            os.environ["MQTASKS_SUPERVISOR_PID"] = str(parent)
            signals = StopSignals()  # replaces the supervisor's handlers
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that came is a stop now
            code = main(signals)
        except SystemExit as exc:
            code = (
                exc.code if isinstance(exc.code, int) else RET_OK if exc.code is None else RET_ERROR
            )
        except BaseException:
            sys.stderr.write(redact(traceback.format_exc()))
        finally:
            # The exit hooks registered so far are this process's too (buffered log
            # lines, metrics and spans to send); the stack above belongs to the supervisor.
            atexit._run_exitfuncs()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

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
        if self.early is not None and self.early.count:
            self.signals, self.stopping = self.early.count, True
        for slot in range(self.processes):
            if self.stopping:  # a child started now would never hear of the stop
                break
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
