"""Circuits: the circuit breakers of an app, kept for every worker in the result backend.

A task declared with ``@app.task(circuit="payments")`` runs behind the app's
:class:`~mqtasks.CircuitBreaker` of that name. Its state lives in the result
backend, under keys of the breaker's name, so every worker of the app sees it:

* **closed** (no ``circuit:<name>:open`` key): tasks run. A failure of one of
  them with an exception of ``trip_on`` is counted in a counter per ``window``
  (``circuit:<name>:failures:<n>``, one ``incr`` with a TTL); the failures of
  the last ``window`` seconds are estimated from this window's counter and the
  previous one's (the share of it still inside the window). When they reach
  ``failure_threshold`` the worker that counted the last one opens the circuit
  with ``set_if_absent``: exactly one worker logs ``circuit.opened``.
* **open** (the key holds when it opened and when it goes half-open):
  tasks of the circuit are not run and not failed: each is deferred (published
  again with the same attempt number, held by the broker) until the reset
  timeout is over, plus a little jitter, so attempts during an open circuit do
  not use up retries.
* **half-open** (``reset_timeout`` has passed): the first task to arrive
  claims the probe (``circuit:<name>:probe``, ``set_if_absent``) and runs; the
  others are deferred a short while (:data:`HALF_OPEN_WAIT`). The probe's
  success closes the circuit (its keys deleted); its failure with a ``trip_on``
  exception opens it again for another ``reset_timeout``. Any other outcome
  (the task's own error, a retry it asked for) proves nothing: the probe is
  released and the next task probes.

Operators force the state with :func:`open_circuit` and :func:`close_circuit`
(``mqtasks circuit -A app open|close NAME``); :func:`circuit_status` reads it
(``mqtasks status``). Transitions are logged (``circuit.opened``,
``circuit.half_open``, ``circuit.closed``) by the worker that made them,
counted in StatsD when the app has :class:`~mqtasks.middleware.StatsdMetrics`,
and added as events to the current OpenTelemetry span.

Workers compare wall-clock times (``time.time()``) written by other workers:
their clocks are assumed to agree within a fraction of ``reset_timeout``.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import structlog

from ..exceptions import BackendError, ConfigurationError, MiddlewareError, SkipMessage, TaskControl
from .base import DeferBackoff, Middleware
from .otel import span_event
from .statsd import StatsdMetrics, sanitize

if TYPE_CHECKING:
    from ..app import App
    from ..backend.base import Backend
    from ..flow.circuit import CircuitBreaker
    from ..message import Message
    from ..task import Task
    from ..worker import Worker

__all__ = [
    "HALF_OPEN_WAIT",
    "KEY_PREFIX",
    "PROBE_TTL",
    "STATE_CACHE_S",
    "Circuits",
    "circuit_status",
    "close_circuit",
    "open_circuit",
]

logger = structlog.get_logger("mqtasks.circuits")

#: Put in front of every key of a circuit in the backend (which adds its own prefix).
KEY_PREFIX = "circuit:"
#: Seconds a worker trusts the state it last read of a circuit. Without it every
#: task of a closed circuit would cost a backend read; with it a trip made by
#: another worker is seen that much later at most. The worker that trips it, the
#: one whose probe closes it, and any worker whose last task of the circuit
#: failed with a trip_on error (its next task reads the state afresh) see it at once.
STATE_CACHE_S = 0.5
#: Longest wait, in seconds, of a task deferred while another worker's probe runs
#: (shorter for a circuit whose reset_timeout is shorter).
HALF_OPEN_WAIT = 1.0
#: Seconds the probe claim is held at least (longer for a task with a longer
#: time_limit); a worker that dies during its probe frees it at expiry.
PROBE_TTL = 60.0
#: Seconds an automatic open record outlives the moment its circuit goes half-open:
#: a circuit whose tasks stopped coming closes by itself after that.
OPEN_HOLD = 3600.0
#: TTL of a circuit forced open until closed (ten years).
FOREVER = 10 * 365 * 86400.0

#: States, as :func:`circuit_status` names them.
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


def _key(name: str, part: str) -> str:
    return f"{KEY_PREFIX}{name}:{part}"


@dataclass(frozen=True)
class _Open:
    """What the ``open`` key of a circuit holds."""

    #: When it opened (``time.time()``).
    opened_at: float
    #: When it goes half-open; None: forced open until closed.
    until: float | None
    #: Whether an operator opened it.
    forced: bool
    #: Why: ``failures``, ``probe_failed`` or ``forced``.
    reason: str

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> _Open | None:
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            until = d.get("until")
            return cls(
                float(d["opened_at"]),
                None if until is None else float(until),
                bool(d.get("forced")),
                str(d.get("reason", "")),
            )
        except (ValueError, KeyError, TypeError):
            # Not written by this module: treat it as open now, for a reset_timeout.
            return cls(time.time(), time.time(), False, "unreadable")

    def state(self, now: float) -> str:
        return OPEN if self.until is None or now < self.until else HALF_OPEN

    def ttl(self, now: float) -> float:
        return FOREVER if self.until is None else max(1.0, self.until - now) + OPEN_HOLD


def _read(backend: Backend, name: str) -> _Open | None:
    return _Open.decode(backend.get(_key(name, "open")))


def _failures(backend: Backend, breaker: CircuitBreaker, now: float, added: int = 0) -> float:
    """The failures of the last ``window`` seconds (after adding ``added`` to this window's)."""
    window = breaker.window
    n = int(now // window)
    key = _key(breaker.name, f"failures:{n}")
    current = backend.incr(key, added, ttl=2 * window + 1) if added else _int(backend.get(key))
    previous = _int(backend.get(_key(breaker.name, f"failures:{n - 1}")))
    return current + previous * (1.0 - (now % window) / window)


def _int(raw: bytes | None) -> int:
    return int(raw) if raw else 0


def _clear(backend: Backend, breaker: CircuitBreaker, now: float) -> None:
    """Delete the open record, the probe claim and the failure counters."""
    n = int(now // breaker.window)
    for part in ("open", "probe", f"failures:{n}", f"failures:{n - 1}"):
        backend.delete(_key(breaker.name, part))


def _counts(breaker: CircuitBreaker, exception: BaseException | None) -> bool:
    """Whether ``exception`` is a failure of the circuit's dependency."""
    return (
        exception is not None
        and isinstance(exception, breaker.trip_on)
        and not isinstance(exception, (TaskControl, MiddlewareError))
    )


def _announce(app: App, event: str, breaker: CircuitBreaker, **fields: Any) -> None:
    """Log ``event`` (``circuit.opened``...), count it in StatsD, add it to the current span."""
    log = logger.warning if event == "circuit.opened" else logger.info
    log(event, circuit=breaker.name, **fields)
    name = sanitize(breaker.name)
    for mw in app.middleware:
        if isinstance(mw, StatsdMetrics):
            mw.incr(f"{event}.{name}")
            state = {"circuit.opened": 2, "circuit.half_open": 1}.get(event, 0)
            mw.gauge(f"circuit.state.{name}", state)
    span_event(f"mqtasks.{event}", {"mqtasks.circuit.name": breaker.name})


class Circuits(Middleware):
    """Runs the tasks of a circuit only while it is closed (or as its half-open probe).

    Workers install it for an app whose tasks use circuits
    (:meth:`for_app`), before the result middleware, so that a task deferred
    because its circuit is open is never marked started. One instance serves
    every worker thread; it keeps a short cache of each circuit's state
    (:data:`STATE_CACHE_S`).

    Args:
        defer_delay: Seconds a task is deferred when the backend cannot be read;
            doubled for each failure in a row (with jitter), up to ``max_defer_delay``.
        max_defer_delay: The longest such hold, in seconds.
    """

    def __init__(self, *, defer_delay: float = 1.0, max_defer_delay: float = 30.0) -> None:
        self._backoff = DeferBackoff(defer_delay, max_defer_delay)
        # name -> (monotonic time the entry expires, the open record or None for closed)
        self._cache: dict[str, tuple[float, _Open | None]] = {}
        # Message id -> circuit name of the probes this worker runs. By id, not per
        # thread: a task given up past its time limit is settled from another thread.
        self._probes: dict[str, str] = {}

    def __repr__(self) -> str:
        return "Circuits()"

    @classmethod
    def for_app(cls, app: App) -> Circuits | None:
        """Return the middleware a worker of ``app`` adds to its stack, or None.

        None when none of the app's tasks uses a circuit, or when the app
        installs a :class:`Circuits` itself (in ``app.middleware``, to choose
        its place in the stack): two would each defer the other's probe.
        """
        if any(isinstance(mw, Circuits) for mw in app.middleware):
            return None
        if any(task.flow.circuit is not None for task in app.tasks.values()):
            return cls()
        return None

    # -- before the task --------------------------------------------------------

    def before_process(self, worker: Worker, message: Message) -> None:
        """Let the task run if its circuit is closed, or as the half-open probe; else defer it.

        Raises:
            SkipMessage: The circuit is open, or half-open with another task as
                its probe, or the backend cannot be read: the message was deferred.
        """
        breaker, task = _circuit_of(worker, message)
        if breaker is None or task is None:
            return
        app = worker.app
        now = time.time()
        try:
            record = self._state(app.backend, breaker.name)
            if record is None:
                self._backoff.reset()
                return
            if record.state(now) == HALF_OPEN and self._claim(app, breaker, task, message):
                return
        except BackendError as exc:
            delay = self._backoff.next_delay()
            logger.error(
                "circuit.check_failed",
                circuit=breaker.name,
                task_id=message.id,
                error=str(exc),
                delay=round(delay, 3),
                note="deferred: the task runs once the circuit can be read",
            )
            worker.defer(message, delay, "circuit_check_failed")
            raise SkipMessage("deferred: the result backend cannot be read") from exc
        record = self._cached(breaker.name) or record
        if record.state(now) == OPEN:
            left = breaker.reset_timeout if record.until is None else record.until - now
            delay = left + random.uniform(0.0, max(0.1, min(5.0, 0.25 * breaker.reset_timeout)))
            reason = "circuit_open"
        else:
            wait = min(HALF_OPEN_WAIT, breaker.reset_timeout)
            delay = wait * random.uniform(0.5, 1.0)
            reason = "circuit_half_open"
        span_event(
            "mqtasks.circuit.deferred",
            {"mqtasks.circuit.name": breaker.name, "mqtasks.circuit.delay": delay},
        )
        worker.defer(message, delay, reason)
        raise SkipMessage(f"circuit {breaker.name!r} is {record.state(now)}")

    def _state(self, backend: Backend, name: str) -> _Open | None:
        entry = self._cache.get(name)
        mono = time.monotonic()
        if entry is not None and entry[0] > mono:
            return entry[1]
        record = _read(backend, name)
        self._cache[name] = (mono + STATE_CACHE_S, record)
        return record

    def _cached(self, name: str) -> _Open | None:
        entry = self._cache.get(name)
        return None if entry is None else entry[1]

    def _remember(self, name: str, record: _Open | None) -> None:
        self._cache[name] = (time.monotonic() + STATE_CACHE_S, record)

    def _claim(
        self, app: App, breaker: CircuitBreaker, task: Task[Any, Any], message: Message
    ) -> bool:
        """Claim the half-open probe for ``message``; return whether it runs now."""
        backend = app.backend
        ttl = max(PROBE_TTL, 2 * (task.time_limit or 0.0))
        owner = f"{socket.gethostname()}:{os.getpid()}:{message.id}"
        if not backend.set_if_absent(_key(breaker.name, "probe"), owner.encode(), ttl):
            return False
        # Read again: the circuit may have closed, or opened again, since it was cached.
        now = time.time()
        record = _read(backend, breaker.name)
        self._remember(breaker.name, record)
        if record is None or record.state(now) != HALF_OPEN:
            backend.delete(_key(breaker.name, "probe"))
            return record is None
        self._probes[message.id] = breaker.name
        _announce(
            app,
            "circuit.half_open",
            breaker,
            task_id=message.id,
            task_name=message.task,
            open_s=round(now - record.opened_at, 3),
        )
        return True

    # -- after the task ---------------------------------------------------------

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Settle the probe, or count a ``trip_on`` failure (opening the circuit at the threshold)."""
        probe = self._probes.pop(message.id, None)
        breaker, _ = _circuit_of(worker, message)
        if breaker is None:
            return
        try:
            if probe == breaker.name:
                self._settle_probe(worker.app, breaker, message, exception)
            elif _counts(breaker, exception):
                self._count(worker.app, breaker, message, exception)
        except BackendError as exc:
            logger.error(
                "circuit.update_failed",
                circuit=breaker.name,
                task_id=message.id,
                error=str(exc),
                note="this outcome is not counted; a held probe claim frees itself at expiry",
            )

    def _count(
        self, app: App, breaker: CircuitBreaker, message: Message, exception: BaseException | None
    ) -> None:
        # A worker that sees its dependency fail reads the state afresh at its next
        # task, not from its cache: it sees a trip by another worker at once.
        self._cache.pop(breaker.name, None)
        backend = app.backend
        now = time.time()
        failures = _failures(backend, breaker, now, added=1)
        if failures < breaker.failure_threshold:
            return
        record = _Open(now, now + breaker.reset_timeout, False, "failures")
        if backend.set_if_absent(_key(breaker.name, "open"), record.encode(), record.ttl(now)):
            self._remember(breaker.name, record)
            _announce(
                app,
                "circuit.opened",
                breaker,
                reason="failures",
                failures=round(failures, 1),
                window=breaker.window,
                reset_timeout=breaker.reset_timeout,
                task_id=message.id,
                error=type(exception).__name__,
            )

    def _settle_probe(
        self, app: App, breaker: CircuitBreaker, message: Message, exception: BaseException | None
    ) -> None:
        backend = app.backend
        now = time.time()
        record = _read(backend, breaker.name)
        fields = {"task_id": message.id, "task_name": message.task}
        if record is None or record.forced:
            # Closed, or forced open, by an operator while the probe ran: theirs to decide.
            backend.delete(_key(breaker.name, "probe"))
            self._remember(breaker.name, record)
        elif exception is None:
            _clear(backend, breaker, now)
            self._remember(breaker.name, None)
            _announce(
                app,
                "circuit.closed",
                breaker,
                reason="probe_succeeded",
                open_s=round(now - record.opened_at, 3),
                **fields,
            )
        elif _counts(breaker, exception):
            again = _Open(now, now + breaker.reset_timeout, False, "probe_failed")
            # Written before the claim goes, so that no probe is claimed on the old record.
            backend.put(_key(breaker.name, "open"), again.encode(), again.ttl(now))
            backend.delete(_key(breaker.name, "probe"))
            self._remember(breaker.name, again)
            _announce(
                app,
                "circuit.opened",
                breaker,
                reason="probe_failed",
                reset_timeout=breaker.reset_timeout,
                error=type(exception).__name__,
                **fields,
            )
        else:
            backend.delete(_key(breaker.name, "probe"))
            logger.info(
                "circuit.probe_inconclusive",
                circuit=breaker.name,
                outcome=type(exception).__name__,
                note="neither a success nor a trip_on failure: the next task probes",
                **fields,
            )

    def worker_shutdown(self, worker: Worker) -> None:
        """Forget the cached states (a worker started again reads them afresh)."""
        self._cache.clear()


def _circuit_of(
    worker: Worker, message: Message
) -> tuple[CircuitBreaker | None, Task[Any, Any] | None]:
    task = worker.app.tasks.get(message.task)
    name = task.flow.circuit if task is not None else None
    if name is None:
        return None, None
    return worker.app.circuits.get(name), task


# -- operators ------------------------------------------------------------------


def _breaker(app: App, name: str) -> CircuitBreaker:
    breaker = app.circuits.get(name)
    if breaker is None:
        declared = ", ".join(sorted(app.circuits)) or "none"
        raise ConfigurationError(
            f"App {app.name!r} has no circuit {name!r} (declared: {declared})."
        )
    if not app.has_backend:
        raise ConfigurationError(
            f"App {app.name!r} has no result backend, where circuits are kept: "
            "App(..., backend='redis://...') or MQTASKS_BACKEND_URL."
        )
    return breaker


def open_circuit(app: App, name: str, *, for_seconds: float | None = None) -> None:
    """Force circuit ``name`` open: its tasks wait, none runs, not even a probe.

    Args:
        app: The app that declares the circuit.
        name: The circuit's name.
        for_seconds: Hold it open this long, then let it go half-open (one probe)
            as after an automatic trip; None holds it open until
            :func:`close_circuit`.

    Raises:
        ConfigurationError: The app declares no such circuit, or has no result
            backend, or ``for_seconds`` is not positive.
        BackendError: The backend cannot be written.
    """
    breaker = _breaker(app, name)
    if for_seconds is not None and not for_seconds > 0:
        raise ConfigurationError(f"--for must be positive seconds, not {for_seconds!r}.")
    now = time.time()
    until = None if for_seconds is None else now + for_seconds
    record = _Open(now, until, True, "forced")
    app.backend.put(_key(name, "open"), record.encode(), record.ttl(now))
    _announce(app, "circuit.opened", breaker, reason="forced", for_s=for_seconds)


def close_circuit(app: App, name: str) -> None:
    """Close circuit ``name``: its tasks run again, its failure count starts over.

    Raises:
        ConfigurationError: The app declares no such circuit, or has no result backend.
        BackendError: The backend cannot be written.
    """
    breaker = _breaker(app, name)
    _clear(app.backend, breaker, time.time())
    _announce(app, "circuit.closed", breaker, reason="forced")


def circuit_status(app: App) -> list[dict[str, Any]]:
    """The state of each circuit of ``app``, by name, read from the result backend.

    Each entry (every value JSON-able): ``name``; ``state`` (``closed``,
    ``open`` or ``half-open``); ``forced`` (opened by an operator); ``failures``
    (counted in the last ``window`` seconds, estimated) and ``failure_threshold``;
    ``window`` and ``reset_timeout``; ``opened_at`` and ``half_open_at`` (ISO
    8601 UTC, or None: closed, or forced open until closed); ``probe`` (whether
    a half-open probe runs now).

    Raises:
        BackendError: The backend cannot be read.
    """
    if not app.circuits:
        return []
    if not app.has_backend:
        _breaker(app, next(iter(app.circuits)))  # raises the error that says what to do
    backend = app.backend
    now = time.time()
    out: list[dict[str, Any]] = []
    for name, breaker in sorted(app.circuits.items()):
        record = _read(backend, name)
        out.append(
            {
                "name": name,
                "state": CLOSED if record is None else record.state(now),
                "forced": bool(record and record.forced),
                "failures": round(_failures(backend, breaker, now), 1),
                "failure_threshold": breaker.failure_threshold,
                "window": breaker.window,
                "reset_timeout": breaker.reset_timeout,
                "opened_at": _iso(record.opened_at if record else None),
                "half_open_at": _iso(record.until if record else None),
                "probe": record is not None and backend.get(_key(name, "probe")) is not None,
            }
        )
    return out


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat()
