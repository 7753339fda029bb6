"""Limits: rate limits and concurrency limits, kept across every worker in the result backend.

``@app.task(rate_limit="100/s")`` is a token bucket in the backend
(:meth:`~mqtasks.backend.base.Backend.take_token`); ``rate_key="user_id"``
gives each value of that argument a bucket of its own.
``@app.task(concurrency_limit=5)`` is five lease-based slots
(:meth:`~mqtasks.backend.base.Backend.acquire_slot`). Each check is one atomic
backend operation per task; tasks without a limit cost nothing.

A task that must wait is never run early, and never holds a worker thread
for long: a wait for a token of at most :data:`SHORT_WAIT` seconds reserves
the token and sleeps in the worker thread, then runs; a longer one is
deferred (:meth:`~mqtasks.worker.Worker.defer`: held by the broker, same
attempt) to its place in the bucket's schedule. A task refused a slot is
deferred for a backoff that doubles with each refusal of that message
(:data:`HEADER_WAITS`), up to :data:`MAX_CONCURRENCY_BACKOFF`.

A slot is a lease of ``slot_ttl`` seconds, renewed by a thread of the
middleware while the task runs, and released in ``after_process`` (which the
worker also runs for a task it gave up past its hard time limit, and for a
message a later middleware skipped). A worker that is SIGKILLed does neither:
its slots free themselves when their lease expires.
"""

from __future__ import annotations

import contextvars
import hashlib
import itertools
import json
import os
import random
import socket
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import structlog

from ..exceptions import BackendError, SkipMessage
from .base import DeferBackoff, Middleware
from .otel import span_event
from .statsd import StatsdMetrics, sanitize

if TYPE_CHECKING:
    from ..app import App
    from ..backend import Backend
    from ..config import Settings
    from ..flow.options import Rate
    from ..message import Message
    from ..task import Task
    from ..worker import Worker

__all__ = [
    "BURST_SECONDS",
    "CONCURRENCY_BACKOFF",
    "HEADER_WAITS",
    "MAX_CONCURRENCY_BACKOFF",
    "SHORT_WAIT",
    "SLOT_TTL",
    "SPARE_BATCH",
    "SPARE_TTL",
    "Limits",
    "bucket_capacity",
    "limit_status",
    "rate_bucket",
    "slots_key",
]

logger = structlog.get_logger("mqtasks.limits")

#: Longest wait for a token spent asleep in the worker thread (the token reserved
#: meanwhile). Shorter than a deferral's round trip through the broker is worth
#: (a publish, an ack, a redelivery, and the Redis broker's delay poll of 0.1 s),
#: and short enough that a thread held that long costs the worker little.
SHORT_WAIT = 0.25
#: The bucket holds this many seconds' worth of tokens (at least one, at most the
#: rate's count): a burst after an idle spell stays near the rate, so that no
#: one-second window runs far above it.
BURST_SECONDS = 0.1
#: Seconds a concurrency slot's lease lasts unless renewed: how long the slot of a
#: SIGKILLed worker stays taken. Renewed every third of it while its task runs.
SLOT_TTL = 30.0
#: The first deferral of a task refused a slot, in seconds; doubled for each
#: refusal of that message, up to :data:`MAX_CONCURRENCY_BACKOFF`.
CONCURRENCY_BACKOFF = 0.5
#: The longest deferral of a task refused a slot, in seconds.
MAX_CONCURRENCY_BACKOFF = 15.0
#: Seconds a worker may keep tokens it took ahead: a bucket far from its limit (more
#: than half full) hands a worker several tokens in one operation, which its next
#: tasks use within this time (unused ones are dropped: the rate is never exceeded,
#: a use moves by at most this much). Only for rates where that is several tokens.
SPARE_TTL = 0.05
#: Most tokens taken in one operation.
SPARE_BATCH = 16
#: Header: how many times this message was refused a concurrency slot.
HEADER_WAITS = "mqtasks-limit-waits"

#: Argument values longer than this name their bucket by a hash.
_MAX_KEY_TEXT = 100

#: The slot this message's run holds, if any: ``(key, owner)``. One context per message.
_held: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "mqtasks_limit_slot", default=None
)
_owners = itertools.count(1)
_HOST = f"{socket.gethostname()}"


def bucket_capacity(rate: Rate) -> float:
    """The tokens the bucket of ``rate`` holds: :data:`BURST_SECONDS` of it, within [1, count]."""
    return max(1.0, min(rate.count, rate.per_second * BURST_SECONDS))


def rate_bucket(task: str, key_value: Any = None, *, keyed: bool = False) -> str:
    """The backend key of ``task``'s token bucket (of the bucket of ``key_value``, if ``keyed``)."""
    if not keyed:
        return f"flow:rate:{task}"
    text = key_value if isinstance(key_value, str) else json.dumps(key_value, default=str)
    if len(text) > _MAX_KEY_TEXT:
        text = "sha1-" + hashlib.sha1(text.encode()).hexdigest()
    return f"flow:rate:{task}:{text}"


def slots_key(task: str) -> str:
    """The backend key of ``task``'s concurrency slots."""
    return f"flow:slots:{task}"


class Limits(Middleware):
    """Keeps the rate and concurrency limits of the app's tasks across every worker.

    Build it with :meth:`for_app`. Install it before
    :class:`~mqtasks.middleware.results.Results` (so that a deferred task is
    never marked started), after the app's own middleware.

    Args:
        slot_ttl: Seconds a concurrency slot's lease lasts unless renewed.
        short_wait: Longest wait for a token spent asleep in the worker thread.
        defer_delay: The first deferral after the backend could not be reached.
        max_defer_delay: The longest such deferral.
    """

    def __init__(
        self,
        *,
        slot_ttl: float = SLOT_TTL,
        short_wait: float = SHORT_WAIT,
        defer_delay: float = 1.0,
        max_defer_delay: float = 30.0,
    ) -> None:
        if slot_ttl <= 0 or short_wait < 0:
            raise ValueError("slot_ttl must be positive and short_wait at least 0")
        self.slot_ttl = slot_ttl
        self.short_wait = short_wait
        self._backoff = DeferBackoff(defer_delay, max_defer_delay)
        self._lock = threading.Lock()
        #: Held slots: owner -> (key, the worker's id); renewed while held.
        self._held: dict[str, tuple[str, int]] = {}
        self._backend: Backend | None = None
        self._renewer: threading.Thread | None = None
        #: Tokens taken ahead, per bucket: (how many, monotonic time they are good until).
        self._spare: dict[str, tuple[int, float]] = {}
        self._wake = threading.Event()

    def __repr__(self) -> str:
        return f"Limits(slot_ttl={self.slot_ttl}, short_wait={self.short_wait})"

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits | None:
        """Not part of the default stack: a worker adds it for apps that need it (:meth:`for_app`)."""
        return None

    @classmethod
    def for_app(cls, app: App, **options: Any) -> Limits | None:
        """Return a :class:`Limits` if a task of ``app`` has a rate or concurrency limit, else None."""
        if any(task.flow.limited for task in app.tasks.values()):
            return cls(**options)
        return None

    # -- processing -------------------------------------------------------------------------

    def before_process(self, worker: Worker, message: Message) -> None:
        """Take a slot and a token for a limited task; sleep a short wait, defer a long one.

        Raises:
            SkipMessage: The message was deferred (to wait for its turn, or
                because the backend could not be reached).
        """
        task = worker.app.tasks.get(message.task)
        if task is None or not task.flow.limited:
            return
        flow = task.flow
        slot: tuple[str, str] | None = None
        try:
            if flow.concurrency_limit is not None:
                slot = self._acquire(worker, message, task.name, flow.concurrency_limit)
            if flow.rate_limit is not None:
                self._take_token(worker, message, task, flow.rate_limit, slot)
        except BackendError as exc:
            if slot is not None:
                self._release(worker, slot)
            delay = self._backoff.next_delay()
            logger.error(
                "task.limit_check_failed",
                task_id=message.id,
                task_name=message.task,
                error=str(exc),
                delay=round(delay, 3),
                note="deferred: the task runs once the backend answers",
            )
            worker.defer(message, delay, "limit_check_failed")
            raise SkipMessage("deferred: the result backend cannot be reached") from exc
        self._backoff.reset()

    def _acquire(self, worker: Worker, message: Message, task: str, limit: int) -> tuple[str, str]:
        key = slots_key(task)
        owner = f"{os.getpid()}@{_HOST}:{next(_owners)}:{message.id}"
        acquired, held = worker.app.backend.acquire_slot(key, owner, limit=limit, ttl=self.slot_ttl)
        if not acquired:
            waits = _int(message.headers.get(HEADER_WAITS))
            delay = min(MAX_CONCURRENCY_BACKOFF, CONCURRENCY_BACKOFF * 2.0 ** min(waits, 16))
            delay *= random.uniform(1.0, 1.25)
            logger.debug(
                "task.concurrency_limited",
                task_id=message.id,
                task_name=task,
                held=held,
                limit=limit,
                delay=round(delay, 3),
            )
            self._count(worker, "task.concurrency_limited", task)
            span_event("mqtasks.concurrency_limited", {"mqtasks.limit.delay": delay})
            deferred = message.copy(headers={**message.headers, HEADER_WAITS: waits + 1})
            worker.defer(deferred, delay, "concurrency_limited")
            raise SkipMessage(f"concurrency_limit {limit} of {task} reached")
        slot = (key, owner)
        _held.set(slot)
        with self._lock:
            self._held[owner] = (key, id(worker))
            self._backend = worker.app.backend
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew_loop, name="mqtasks-limit-slots", daemon=True
                )
                self._renewer.start()
        return slot

    def _take_token(
        self,
        worker: Worker,
        message: Message,
        task: Task[Any, Any],
        rate: Rate,
        slot: tuple[str, str] | None,
    ) -> None:
        rate_key = task.flow.rate_key
        if rate_key is None:
            key = rate_bucket(task.name)
        else:
            bound = task.signature.bind(*message.args, **message.kwargs)
            bound.apply_defaults()
            key = rate_bucket(task.name, bound.arguments.get(rate_key), keyed=True)
        if self._spare and self._take_spare(key):
            return
        count = max(1, min(SPARE_BATCH, int(rate.per_second * SPARE_TTL)))
        grant = worker.app.backend.take_token(
            key,
            rate=rate.per_second,
            capacity=bucket_capacity(rate),
            max_wait=self.short_wait,
            count=count,
        )
        if grant.taken > 1:
            with self._lock:
                if len(self._spare) > 1000:  # drop the stale ones of many keyed buckets
                    now = time.monotonic()
                    self._spare = {k: v for k, v in self._spare.items() if v[1] > now}
                left, _ = self._spare.get(key, (0, 0.0))
                self._spare[key] = (left + grant.taken - 1, time.monotonic() + SPARE_TTL)
        if grant.granted:
            if grant.wait > 0:
                logger.debug(
                    "task.rate_waited", task_id=message.id, task_name=task.name, wait=grant.wait
                )
                time.sleep(grant.wait)
            return
        if slot is not None:
            self._release(worker, slot)
        # Refused callers are spread one interval apart by the bucket's schedule; the
        # jitter is only ever later, as one back before its turn would be refused again.
        delay = grant.wait + random.uniform(0.0, min(0.1, 0.5 / rate.per_second))
        logger.debug(
            "task.rate_limited",
            task_id=message.id,
            task_name=task.name,
            rate=str(rate),
            delay=round(delay, 3),
        )
        self._count(worker, "task.rate_limited", task.name)
        span_event("mqtasks.rate_limited", {"mqtasks.limit.delay": delay})
        worker.defer(message, delay, "rate_limited")
        raise SkipMessage(f"rate_limit {rate} of {task.name}: deferred {delay:.3f} s")

    def _take_spare(self, key: str) -> bool:
        """Use a token taken ahead for ``key`` if one is left and still good."""
        with self._lock:
            spare = self._spare.get(key)
            if spare is None:
                return False
            left, until = spare
            if until <= time.monotonic():
                del self._spare[key]
                return False
            if left > 1:
                self._spare[key] = (left - 1, until)
            else:
                del self._spare[key]
            return True

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Release the slot this message's run holds, if any."""
        slot = _held.get()
        if slot is not None:
            _held.set(None)
            self._release(worker, slot)

    def worker_shutdown(self, worker: Worker) -> None:
        """Stop renewing; release the slots still held (none, unless a run was cut off)."""
        with self._lock:
            held = [(k, o) for o, (k, w) in self._held.items() if w == id(worker)]
        self._wake.set()
        for slot in held:
            self._release(worker, slot)

    # -- slots ------------------------------------------------------------------------------

    def _release(self, worker: Worker, slot: tuple[str, str]) -> None:
        key, owner = slot
        with self._lock:
            self._held.pop(owner, None)
        try:
            worker.app.backend.release_slot(key, owner)
        except BackendError as exc:
            logger.warning(
                "task.slot_release_failed",
                key=key,
                error=str(exc),
                note=f"the slot frees itself within {self.slot_ttl:g} s",
            )

    def _renew_loop(self) -> None:
        """Renew the held slots every third of their ttl; end when none is held."""
        while True:
            self._wake.wait(self.slot_ttl / 3)
            self._wake.clear()
            with self._lock:
                if not self._held:
                    self._renewer = None
                    return
                by_key: dict[str, list[str]] = defaultdict(list)
                for owner, (key, _) in self._held.items():
                    by_key[key].append(owner)
                app_backend = self._backend
            if app_backend is None:
                continue
            for key, owners in by_key.items():
                try:
                    app_backend.renew_slots(key, owners, self.slot_ttl)
                except BackendError as exc:
                    logger.warning("task.slot_renew_failed", key=key, error=str(exc))

    # -- observability ----------------------------------------------------------------------

    def _count(self, worker: Worker, stat: str, task: str) -> None:
        for mw in worker.app.middleware:
            if isinstance(mw, StatsdMetrics):
                mw.incr(f"{stat}.{sanitize(task)}")


def _int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def limit_status(app: App) -> list[dict[str, Any]]:
    """Each limit of the app's tasks and its current use, for ``mqtasks status``.

    One entry per limit: ``{"task", "kind": "rate", "limit": "50/1s",
    "capacity", "tokens"}`` (the tokens left now; ``"per": "<arg>"`` and no
    tokens for a bucket per argument value, whose buckets are not listed) and
    ``{"task", "kind": "concurrency", "limit": 5, "held": 2}``. A limit whose
    state cannot be read has ``"error"`` instead.
    """
    found: list[dict[str, Any]] = []
    for name in sorted(app.tasks):
        flow = app.tasks[name].flow
        rate = flow.rate_limit
        if rate is not None:
            entry: dict[str, Any] = {"task": name, "kind": "rate", "limit": str(rate)}
            entry["capacity"] = capacity = bucket_capacity(rate)
            if flow.rate_key is not None:
                entry["per"] = flow.rate_key
            else:
                try:
                    tokens = app.backend.peek_tokens(
                        rate_bucket(name), rate=rate.per_second, capacity=capacity
                    )
                    entry["tokens"] = round(tokens, 3)
                except BackendError as exc:
                    entry["error"] = str(exc)
            found.append(entry)
        if flow.concurrency_limit is not None:
            entry = {"task": name, "kind": "concurrency", "limit": flow.concurrency_limit}
            try:
                entry["held"] = app.backend.slots_held(slots_key(name))
            except BackendError as exc:
                entry["error"] = str(exc)
            found.append(entry)
    return found
