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
interpreter. The first children start as in (a): they share, copy-on-write,
every page the supervisor filled before forking: the interpreter, mqtasks,
kombu and the app's own modules, which are most of a worker's memory; under (b)
each child imports all of them again into private pages. Celery's prefork pool
and ``gunicorn --preload`` do the same; Dramatiq forks from a parent that has
not imported the app, so its children share less. Then the supervisor has no
more use for what it imported, so it replaces itself (``os.execv``, same pid)
by ``mqtasks/_supervise.py``, which imports only the standard library, as in
(b): the children keep sharing their pages with each other, and the
supervisor's own memory falls to that of a bare interpreter. A child that dies
is replaced by a fresh interpreter (``python -m mqtasks worker ...
--processes 1``), which loads the app itself: the supervisor no longer holds it
to fork from.

Forking is safe only from a process with one thread and no connection: before
the first child, :func:`fork_blockers` looks for other threads (a StatsD flush
thread, an OpenTelemetry batch span processor started at import) and connected
sockets (an app that published at import); where it finds any, the children
start as fresh interpreters instead, as in (b) but with the app loaded, and the
supervisor logs why (and it stays as it is while another thread runs). The
supervisor logs without a writer thread for the same reason
(``background=False`` in :func:`mqtasks.logging.configure_logging`), and
freezes the collector's generations before forking so that a child's garbage
collection does not copy the pages it shares. A child replaces the supervisor's
signal handlers with :class:`StopSignals` before anything else (the stop signals
are blocked across ``fork()`` until then), configures its own logging, builds
its worker, connects, and exits through ``os._exit`` after the exit hooks, never
returning into the supervisor's stack. The stop signals are blocked across the
``execv`` too, until the new program has its handlers: none is lost.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import socket
import stat
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import structlog

from . import _supervise
from . import logging as logs
from ._url import redact
from .config import mask_url
from .exceptions import MQTasksError

if TYPE_CHECKING:
    from .worker import Worker

__all__ = [
    "LOAD_DIR_ENV",
    "MMAP_THRESHOLD",
    "RET_ERROR",
    "RET_FORCED",
    "RET_OK",
    "RET_RECYCLE",
    "RET_TIMEOUT",
    "SUPERVISE_SCRIPT",
    "ChildMain",
    "Companion",
    "StopSignals",
    "Supervisor",
    "SupervisorExporter",
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
#: Exit code: the worker asked to be replaced by a fresh process (threads past their
#: hard time limit piled up); a supervisor starts the replacement at once.
RET_RECYCLE = _supervise.RET_RECYCLE

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


class SupervisorExporter(Protocol):
    """What the supervisor serves metrics with (``--metrics-port``; see
    :class:`~mqtasks.middleware.prometheus.SupervisorMetrics`)."""

    def start(self) -> object:
        """Start serving; called once the first children are forked."""

    def child_exited(self, pid: int) -> None:
        """Drop what only a live child ``pid`` counts (its gauges)."""


class Companion(Protocol):
    """Something that runs beside a worker (an autoscaler, a load reporter)."""

    def start(self) -> None:
        """Start; called once the worker consumes."""

    def stop(self) -> None:
        """Stop; called before the worker stops."""


def run_worker(
    w: Worker, signals: StopSignals | None = None, *, companions: Sequence[Companion] = ()
) -> int:
    """Run ``w`` until a signal; return the exit code.

    Args:
        w: The worker, not started yet.
        signals: Handlers installed earlier (:class:`StopSignals`); installed
            here if None. A signal that came already stops the worker before it
            connects, with exit code 0.
        companions: Started once the worker consumes, stopped before it stops
            (``mqtasks worker --autoscale``'s autoscaler or load reporter).

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
    for companion in companions:
        companion.start()
    recycle = False
    try:
        while not stop.wait(0.5):
            if w.join(0):  # the I/O thread ended on its own
                return RET_ERROR
            if w.recycle.is_set():
                # Threads Python cannot stop hold memory and maybe locks: a fresh
                # process serves on, once this one finished its other tasks.
                logger.warning("worker.recycling", reason=w.recycle_reason)
                recycle = True
                break
            if supervisor and str(os.getppid()) != supervisor:
                logger.warning("worker.orphaned", supervisor=supervisor)
                break
    finally:
        for companion in companions:
            companion.stop()
    clean = w.stop()
    if recycle:
        return RET_RECYCLE
    return RET_OK if clean else RET_TIMEOUT


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


#: Environment variable naming the directory where each child of a supervisor that
#: scales its children reports its load (``<slot>.json``).
LOAD_DIR_ENV = _supervise.LOAD_DIR_ENV

#: A forked child's work: given its stop-signal handlers, run a worker and return the exit code.
ChildMain = Callable[[StopSignals], int]

#: The program the supervisor becomes once its first children are forked (see the module docstring).
SUPERVISE_SCRIPT = _supervise.__file__


class Supervisor:
    """Runs N worker processes, replaces those that die, and stops them on a signal.

    Once the first children run, the supervisor replaces itself (``os.execv``,
    same pid) by ``mqtasks/_supervise.py``, a program that imports only the
    standard library, and leaves behind the memory of what it imported. It stays
    in this process where that is not safe: while another thread runs.

    Args:
        command: The command line of a child started as a new interpreter: every
            replacement of a child that died, and the first children too unless
            ``fork`` is given. It runs with ``MQTASKS_WORKER_SLOT`` and
            ``MQTASKS_SUPERVISOR_PID`` in its environment.
        processes: How many children to keep running.
        signals: Handlers installed before this supervisor's, while the app was
            loading: a signal they caught stops the supervisor before any child starts.
        fork: What the first children run, forked from this process (see
            :data:`ChildMain`). Fork only from a process :func:`fork_blockers` finds safe.
        log_level: The lowest level of the supervisor's own events that is logged.
        log_format: ``json``, ``console`` or ``auto``, as for
            :func:`mqtasks.logging.configure_logging`.
        autoscale: ``(MIN, MAX)``: scale the number of children with their load,
            starting with ``processes`` (``--autoscale`` with ``--processes``;
            see ``mqtasks/_supervise.py``). The children report their load in
            the directory :data:`LOAD_DIR_ENV` names.
        autoscale_idle: Seconds a child's worth of threads stays unused, with
            nothing waiting, before a child is retired.
        metrics: Serves the children's metrics from this process (``--metrics-port``);
            the supervisor then stays as it is instead of replacing itself, as the
            standard-library program cannot read them.
    """

    def __init__(
        self,
        command: list[str],
        processes: int,
        signals: StopSignals | None = None,
        *,
        fork: ChildMain | None = None,
        log_level: str = "info",
        log_format: str = "auto",
        autoscale: tuple[int, int] | None = None,
        autoscale_idle: float = 30.0,
        metrics: SupervisorExporter | None = None,
    ) -> None:
        self.fork = fork
        self.metrics = metrics
        self.early = signals
        scaling = None
        if autoscale is not None:
            directory = tempfile.mkdtemp(prefix="mqtasks-load-")
            os.environ[LOAD_DIR_ENV] = directory  # every child inherits it
            scaling = _supervise.Autoscaling(*autoscale, autoscale_idle, directory)
        #: The supervision loop, its children and its log (see ``mqtasks/_supervise.py``).
        self.supervision = _supervise.Supervision(
            command, processes, _supervise.LogLines(log_level, log_format), scaling=scaling
        )

    @property
    def children(self) -> dict[int, int]:
        """Running children: slot -> pid."""
        return self.supervision.children

    def run(self) -> int:
        """Run until signalled; return the worst child exit code.

        Where this process can replace itself, it does, and the exit code is
        that of the program it became.
        """
        s = self.supervision
        s.install()
        if self.early is not None and self.early.count:
            s.signals, s.stopping = self.early.count, True
        if self.fork is not None:
            for slot in range(s.processes):
                if s.stopping:  # a child started now would never hear of the stop
                    break
                self._fork(slot, self.fork)
        if self.metrics is not None and not s.stopping:
            s.on_exit = self.metrics.child_exited
            try:
                # A thread: from now on this process stays as it is (see _hand_over).
                self.metrics.start()
            except MQTasksError as exc:  # the children work on; only the page is missing
                s.log.error("supervisor.metrics_failed", error=str(exc))
        if not s.stopping:
            self._hand_over()  # returns only where this process cannot replace itself
        return s.run()

    def _hand_over(self) -> None:
        """Replace this process by the standard-library supervisor; return if it cannot."""
        s = self.supervision
        if threading.active_count() > 1 or not sys.executable:
            # A stop signal delivered to another thread just before execv would be lost.
            return
        logs.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        argv = [sys.executable, "-I", "-S", SUPERVISE_SCRIPT]
        # Blocked across execv: a signal that comes now stays pending until the
        # new program has its handlers (Supervision.install unblocks them).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            if not s.stopping:  # (a handler that ran just before the block)
                os.execv(sys.executable, [*argv, _supervise.handover_state(s), *s.command])
        except OSError as exc:
            s.log.warning("supervisor.handover_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _fork(self, slot: int, main: ChildMain) -> None:
        logs.flush()  # a line still buffered would be written by the child too
        # What is imported by now goes to the collector's permanent generation: a
        # collection in a child never writes to those objects' pages, so they stay shared.
        gc.freeze()
        _release_free_heap()
        parent = os.getpid()
        # Blocked until the child has its own handlers: the supervisor's, copied
        # into the child, would signal the child's siblings. And until the child
        # is among the supervisor's children, whom a stop signal reaches.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._child(slot, parent, main, mask)
            self.supervision.children[slot] = pid
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.supervision.log.info("supervisor.child_started", slot=slot, pid=pid)

    def _child(self, slot: int, parent: int, main: ChildMain, mask: Iterable[int]) -> NoReturn:
        """Run ``main`` in a forked child and exit with its code; never returns."""
        code = RET_ERROR
        try:
            self.supervision.children.clear()  # the siblings are not this process's to signal
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
