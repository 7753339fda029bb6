"""The ``--processes`` supervisor's loop, in a program that imports only the standard library.

Once the first children are forked, the supervisor has nothing left to do with
the app, mqtasks, kombu and the rest of what it imported, but every page of
them stays in its resident set. So it hands its children over to this module,
run by path in a new interpreter that replaces it (``os.execv``, same pid, so
the children are still its children)::

    python -I -S .../mqtasks/_supervise.py STATE COMMAND...

``-I`` keeps this directory off ``sys.path`` (``mqtasks/logging.py`` would
shadow the standard library's) and ``-S`` skips ``site``: the program needs
nothing installed. ``STATE`` is a JSON object (:func:`handover_state`):
``processes``, the running ``children`` by slot, the times of recent
``restarts``, ``log_level`` and ``log_format``. ``COMMAND`` starts a
replacement child: a new interpreter running one worker (``python -m mqtasks
worker ... --processes 1``), which loads the app itself. SIGTERM and SIGINT are
blocked across the ``execv``; :meth:`Supervision.run` unblocks them once its
handlers are installed, so a signal that came meanwhile is handled, not lost.

Importing anything from the ``mqtasks`` package would import the package, so
this module imports only the standard library, and loads its one sibling,
``mqtasks/_scaling.py`` (the autoscaling policy, standard library only too), by
path; :mod:`mqtasks.process` imports it, and runs the same loop in its own
process where it cannot replace itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, TextIO

__all__ = [
    "LOAD_DIR_ENV",
    "RET_ERROR",
    "RET_FORCED",
    "RET_OK",
    "RET_RECYCLE",
    "RET_TIMEOUT",
    "STOP_SIGNALS",
    "Autoscaling",
    "LogLines",
    "Supervision",
    "handover_state",
    "main",
]


def _sibling(name: str) -> ModuleType:
    """Load ``mqtasks/<name>.py`` by path: run as a program (``-I``), this module has no package."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_mqtasks_supervise_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


#: The policy thread autoscaling uses too (``mqtasks/_scaling.py``), loaded by path even
#: when this module is imported from the package, so that it never imports the package.
_scaling: Any = _sibling("_scaling")

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
RET_RECYCLE = 5

#: Environment variable naming the directory where each child reports its load
#: (``<slot>.json``, see ``mqtasks.execution.autoscale.LoadReporter``) when the
#: supervisor scales the number of children.
LOAD_DIR_ENV = "MQTASKS_LOAD_DIR"

#: The signals that stop a worker.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})

#: Seconds between two looks at the children.
POLL_INTERVAL = 0.2
#: Restarts within this many seconds count towards the pause before the next one.
RESTART_WINDOW = 60.0
#: The longest pause before a restart, in seconds.
MAX_RESTART_PAUSE = 10.0

#: Signals a new child gets with their default action, whatever this process does with them
#: (SIGPIPE and SIGXFSZ as ``subprocess.Popen(restore_signals=True)`` restores them).
_DEFAULT_IN_CHILD = tuple(
    sorted(
        {*STOP_SIGNALS, signal.SIGPIPE, *([signal.SIGXFSZ] if hasattr(signal, "SIGXFSZ") else [])}
    )
)

_LEVELS = ("debug", "info", "warning", "error", "critical")
# ConsoleRenderer's styles (structlog.dev): level colours, then dim, bright, reset, key, value.
_LEVEL_STYLES = {
    "critical": "\x1b[31m\x1b[1m",
    "error": "\x1b[31m\x1b[1m",
    "warning": "\x1b[33m\x1b[1m",
    "info": "\x1b[32m\x1b[1m",
    "debug": "\x1b[32m\x1b[1m",
}
_DIM, _BRIGHT, _RESET, _KEY, _VALUE = "\x1b[2m", "\x1b[1m", "\x1b[0m", "\x1b[36m", "\x1b[35m"
#: Characters that make the console format quote a string value.
_QUOTED = frozenset(" \t=\r\n\"'")


class LogLines:
    """Writes the supervisor's events as :func:`mqtasks.logging.configure_logging` renders them.

    One event per line, at once (no buffer, no thread): JSON with the fields,
    ``event``, ``level`` and ``timestamp`` in structlog's order, or the console
    layout of structlog's ``ConsoleRenderer`` (coloured on a terminal).

    Args:
        level: The lowest level written (``debug`` ... ``critical``).
        fmt: ``json``, ``console`` or ``auto`` (console on a terminal).
        stream: Where to write; standard error by default.
    """

    def __init__(self, level: str = "info", fmt: str = "auto", stream: TextIO | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.level = level.lower() if level.lower() in _LEVELS else "info"
        self.threshold = _LEVELS.index(self.level)
        tty = self._isatty()
        self.format = ("console" if tty else "json") if fmt == "auto" else fmt
        self.colors = tty and self.format == "console"

    def _isatty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty is not None and isatty())

    def info(self, event: str, **fields: Any) -> None:
        """Write ``event`` at info level."""
        self.log("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Write ``event`` at warning level."""
        self.log("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """Write ``event`` at error level."""
        self.log("error", event, fields)

    def log(self, level: str, event: str, fields: Mapping[str, Any]) -> None:
        """Write ``event`` with ``fields`` if ``level`` is not below the threshold."""
        if _LEVELS.index(level) < self.threshold:
            return
        line = self.render(level, event, fields, timestamp(time.time()))
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nowhere to log
            pass

    def render(self, level: str, event: str, fields: Mapping[str, Any], stamp: str) -> str:
        """Return the line for one event (without its newline)."""
        if self.format == "json":
            return json.dumps({**fields, "event": event, "level": level, "timestamp": stamp})
        pairs = sorted(fields.items())
        if not self.colors:
            kv = " ".join(f"{k}={_value(v)}" for k, v in pairs)
            return f"{stamp} [{level:<9}] {event:<30} {kv}".rstrip()
        kv = " ".join(f"{_KEY}{k}{_RESET}={_VALUE}{_value(v)}{_RESET}" for k, v in pairs)
        return (
            f"{_DIM}{stamp}{_RESET} [{_LEVEL_STYLES[level]}{level:<9}{_RESET}] "
            f"{_BRIGHT}{event:<30}{_RESET} {kv}"
        ).rstrip()


def _value(value: Any) -> str:
    if isinstance(value, str) and not _QUOTED & set(value):
        return value
    return repr(value)


def timestamp(t: float) -> str:
    """``t`` (epoch seconds) as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it."""
    seconds = int(t)
    micro = round((t - seconds) * 1_000_000)
    if micro >= 1_000_000:
        seconds, micro = seconds + 1, micro - 1_000_000
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{text}.{micro:06d}Z" if micro else f"{text}Z"


def exit_code(status: int) -> int:
    """A wait status as ``subprocess`` reports it: the exit code, or minus the signal."""
    return os.waitstatus_to_exitcode(status)


class Autoscaling:
    """How many children a supervisor runs, between ``minimum`` and ``maximum``, from their load.

    Each child writes its load to ``<directory>/<slot>.json`` every few seconds
    (``mqtasks.execution.autoscale.LoadReporter``): its threads, how many are
    busy, the messages ready in the broker and those it holds waiting. Every
    ``interval`` seconds the supervisor adds them up and asks the policy shared
    with thread autoscaling (``mqtasks/_scaling.py``, a child's threads being
    one unit): every thread busy with messages waiting adds children at once,
    up to what the backlog asks for; a child's worth of threads unused with
    nothing waiting for ``idle`` seconds retires one child (SIGTERM: it
    finishes its tasks). It decides only when every child has reported since
    it started, so children still starting are never counted as idle, nor
    grown for twice.

    Args:
        minimum: The fewest children.
        maximum: The most children.
        idle: Seconds before a child's worth of unused threads retires one.
        directory: Where the children's reports are (the supervisor removes it when done).
        interval: Seconds between two looks at the reports.
    """

    def __init__(
        self, minimum: int, maximum: int, idle: float, directory: str, interval: float = 1.0
    ) -> None:
        self.policy = _scaling.ScalePolicy(minimum, maximum, idle=idle)
        self.directory = directory
        self.interval = interval
        self.next_look = 0.0

    def state(self) -> dict[str, Any]:
        """What ``handover_state`` carries over."""
        p = self.policy
        return {
            "minimum": p.minimum,
            "maximum": p.maximum,
            "idle": p.idle,
            "directory": self.directory,
            "interval": self.interval,
        }

    def report(self, slot: int, pid: int) -> dict[str, Any] | None:
        """The last report of the child ``pid`` in ``slot``, if it is recent."""
        try:
            with open(os.path.join(self.directory, f"{slot}.json"), encoding="utf-8") as f:
                report: dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            return None
        stale = time.time() - float(report.get("at", 0)) > max(10.0, 5 * self.interval)
        return None if stale or report.get("pid") != pid else report

    def decide(self, s: Supervision) -> tuple[int, str, dict[str, Any]] | None:
        """The next number of children, the reason and the load behind it; None to stay."""
        now = time.monotonic()
        if now < self.next_look:
            return None
        self.next_look = now + self.interval
        reports = []
        for slot in range(s.processes):
            pid = s.children.get(slot)
            report = None if pid is None or slot in s.retiring else self.report(slot, pid)
            if report is None:
                return None  # a child is starting, or being replaced
            reports.append(report)
        ready = [int(r["ready"]) for r in reports if r.get("ready") is not None]
        if not ready:
            return None  # no child can read the broker now
        self.policy.unit = max(1, max(int(r["concurrency"]) for r in reports))
        busy = sum(int(r["busy"]) for r in reports)
        # Every child sees the same queues; what each holds waiting is its own.
        waiting = max(ready) + sum(int(r["held"]) for r in reports)
        quiet_since = self.policy.quiet_since
        decision = self.policy.decide(s.processes, busy, waiting, now)
        if decision is None:
            return None
        quiet = 0.0
        if decision[1] == _scaling.IDLE and quiet_since is not None:
            quiet = now - quiet_since
        load = {"busy": busy, "waiting": waiting, "idle_s": round(quiet, 1)}
        return decision[0], decision[1], load

    def close(self) -> None:
        """Remove the reports' directory."""
        shutil.rmtree(self.directory, ignore_errors=True)


class Supervision:
    """Keeps ``processes`` children running, replaces those that die, and stops them on a signal.

    Args:
        command: The command line of a new child: it runs with
            ``MQTASKS_WORKER_SLOT`` and ``MQTASKS_SUPERVISOR_PID`` added to the environment.
        processes: How many children to keep running.
        log: Where the ``supervisor.*`` events go.
        children: Children already running, by slot (forked before this took over).
        restarts: ``time.monotonic()`` of recent restarts (the pause before the next one grows).
        scaling: Scale the number of children with their load (``--autoscale``
            with ``--processes``); ``processes`` is then the number to start with.
        retiring: Slots of children told to stop by the scaling (carried over a handover).
    """

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        log: LogLines,
        children: Mapping[int, int] | None = None,
        restarts: Sequence[float] = (),
        scaling: Autoscaling | None = None,
        retiring: Sequence[int] = (),
    ) -> None:
        self.command = list(command)
        self.processes = processes
        self.log = log
        #: Running (not yet reaped) children: slot -> pid.
        self.children: dict[int, int] = dict(children or {})
        self.restarts = list(restarts)
        self.scaling = scaling
        #: Slots whose child was told to stop because the pool shrank.
        self.retiring = set(retiring)
        self.stopping = False
        #: Stop signals received.
        self.signals = 0
        #: Called with the pid of each child once it is reaped (the metrics' bookkeeping).
        self.on_exit: Callable[[int], None] | None = None

    def on_signal(self, signum: int, frame: Any) -> None:
        """A stop signal: pass it on to every child as SIGTERM (SIGKILL from the third)."""
        # Children ignore SIGINT (Ctrl-C reaches the whole process group); each signal
        # here becomes one SIGTERM per child (first: drain, second: force).
        self.signals += 1
        self.stopping = True
        sig = signal.SIGKILL if self.signals > 2 else signal.SIGTERM
        for slot, pid in self.children.items():
            if self.signals == 1 and slot in self.retiring:
                continue  # stopping already: a second SIGTERM would force it
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def install(self) -> None:
        """Make SIGTERM and SIGINT stop the children, then unblock them (if they were blocked)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def spawn(self, slot: int) -> None:
        """Start a new child in ``slot``; a failure to start it is logged, and retried later."""
        env = {
            **os.environ,
            "MQTASKS_WORKER_SLOT": str(slot),
            "MQTASKS_SUPERVISOR_PID": str(os.getpid()),
        }
        # Blocked until the child is in self.children: a stop signal handled in between
        # would not reach it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.posix_spawnp(
                self.command[0], self.command, env, setsigmask=(), setsigdef=_DEFAULT_IN_CHILD
            )
            self.children[slot] = pid
        except OSError as exc:
            pid = 0
            error = f"{type(exc).__name__}: {exc}"
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pid:
            self.log.info("supervisor.child_started", slot=slot, pid=pid)
        else:
            self.log.error("supervisor.start_failed", slot=slot, error=error)

    def reap(self, slot: int) -> int | None:
        """The exit code of the child in ``slot`` if it has ended (it is then forgotten)."""
        pid = self.children[slot]
        try:
            # WNOWAIT: the pid stays taken (a zombie) until it is out of self.children,
            # so that a signal handler running meanwhile cannot hit a new process.
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return None
        except ChildProcessError:  # reaped elsewhere: its code is unknown
            del self.children[slot]
            self.exited(pid)
            return RET_ERROR
        del self.children[slot]
        _, status = os.waitpid(pid, 0)
        self.exited(pid)
        return exit_code(status)

    def exited(self, pid: int) -> None:
        """Tell :attr:`on_exit` that the child ``pid`` is gone; its error is logged."""
        if self.on_exit is not None:
            try:
                self.on_exit(pid)
            except Exception as exc:
                self.log.warning("supervisor.on_exit_failed", pid=pid, error=repr(exc))

    def run(self) -> int:
        """Start the missing children and supervise them until signalled; return the exit code.

        The exit code is the worst of the children's last ones (see :meth:`stop_code`).
        """
        self.install()
        for slot in range(self.processes):
            if self.stopping:  # a child started now would never hear of the stop
                break
            if slot not in self.children:
                self.spawn(slot)
        codes: dict[int, int] = {}
        try:
            while True:
                for slot in sorted(set(range(self.processes)) | self.children.keys()):
                    if slot in self.children:
                        pid = self.children[slot]
                        code = self.reap(slot)
                        if code is None:
                            continue
                        if self.stopping:
                            codes[slot] = code
                            continue
                        if slot in self.retiring:
                            self.retiring.discard(slot)
                            self.log.info("supervisor.child_retired", slot=slot, pid=pid, code=code)
                            if slot < self.processes:  # grown again meanwhile
                                self.spawn(slot)
                            continue
                        if code == RET_RECYCLE:
                            # Asked for: not a crash, so no pause and no crash-loop count.
                            self.log.info("supervisor.child_recycled", slot=slot, pid=pid)
                            self.spawn(slot)
                            continue
                        self.log.warning("supervisor.child_died", slot=slot, pid=pid, code=code)
                    elif self.stopping:
                        continue
                    self.restart_pause()
                    if not self.stopping:  # a signal during the pause: no replacement
                        self.spawn(slot)
                if self.stopping and not self.children:
                    break
                if self.scaling is not None and not self.stopping:
                    self.autoscale(self.scaling)
                time.sleep(POLL_INTERVAL)
        finally:
            if self.scaling is not None:
                self.scaling.close()
        return max((self.stop_code(c) for c in codes.values()), default=RET_OK)

    def autoscale(self, scaling: Autoscaling) -> None:
        """Start or retire children as ``scaling`` decides from their reports."""
        decision = scaling.decide(self)
        if decision is None:
            return
        target, reason, load = decision
        previous, self.processes = self.processes, target
        self.log.info(
            "supervisor.autoscaled", processes=target, previous=previous, reason=reason, **load
        )
        for slot in range(previous, target):
            if slot not in self.children:  # a child still retiring there is replaced on exit
                self.spawn(slot)
        for slot in range(target, previous):
            pid = self.children.get(slot)
            if pid is not None and slot not in self.retiring:
                self.retiring.add(slot)
                try:
                    os.kill(pid, signal.SIGTERM)  # finishes its tasks, then exits
                except ProcessLookupError:
                    pass

    def stop_code(self, code: int) -> int:
        """The exit code a stopped child stands for."""
        if code == -signal.SIGTERM and self.signals == 1:
            # Killed by our first SIGTERM before it installed its handler: it had
            # not started consuming (the handler comes first), so it held nothing.
            return RET_OK
        # Any other death by a signal is not a clean stop.
        return RET_FORCED if code < 0 else code

    def restart_pause(self) -> None:
        """Wait before a restart: longer when children die in a loop (a bad deploy), up to 10 s."""
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
        pause = min(MAX_RESTART_PAUSE, 0.1 * 2 ** max(0, len(self.restarts) - 2))
        end = now + pause
        while time.monotonic() < end and not self.stopping:
            time.sleep(0.05)


def handover_state(supervision: Supervision) -> str:
    """The ``STATE`` argument that lets :func:`main` carry on ``supervision``."""
    return json.dumps(
        {
            "processes": supervision.processes,
            "children": {str(slot): pid for slot, pid in supervision.children.items()},
            "restarts": supervision.restarts,
            "log_level": supervision.log.level,
            "log_format": supervision.log.format,
            "scaling": supervision.scaling.state() if supervision.scaling else None,
            "retiring": sorted(supervision.retiring),
        }
    )


def main(argv: Sequence[str]) -> int:
    """Carry on a supervision handed over as ``STATE COMMAND...``; return the exit code."""
    state = json.loads(argv[0])
    log = LogLines(state["log_level"], state["log_format"])
    scaling = state.get("scaling")
    supervision = Supervision(
        argv[1:],
        int(state["processes"]),
        log,
        children={int(slot): int(pid) for slot, pid in state["children"].items()},
        restarts=[float(t) for t in state["restarts"]],
        scaling=Autoscaling(**scaling) if scaling else None,
        retiring=[int(slot) for slot in state.get("retiring", [])],
    )
    return supervision.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
