"""The scheduler: sends each tick of the app's periodic schedules once, from any number of processes.

Every ``mqtasks beat`` (and ``mqtasks worker --beat``) runs a :class:`Scheduler`.
They compete for one lease in the result backend; the holder (the leader)
sends the ticks, the others wait to take over. Three layers keep each tick
sent once:

1. **The lease** (renewed every turn, at most a third of its time apart) with a
   fencing token: a new leader's token is greater than every earlier one's.
2. **Fenced claims.** Before publishing, the leader claims each due tick's
   key (``periodic:<app>:sent:<tick id>``) with
   :meth:`~mqtasks.backend.base.Backend.claim_fenced`: one atomic operation
   that claims nothing unless the lease is still held with the leader's
   token. A leader that lost its lease without knowing it (a frozen process)
   claims nothing. Right before publishing, the leader also checks its own
   lease clock: if more of the lease time passed since its last renewal than
   a safe share of it (it was frozen meanwhile), it publishes nothing and
   checks the lease again.
3. **Deterministic task ids** (``periodic:<name>:<tick time>``). A tick
   claimed by an earlier leader but not recorded as confirmed (the earlier
   leader died between its claim and the broker's confirm) is published again
   under the same id; workers run a tick id once (the idempotency record,
   see :mod:`mqtasks.middleware.idempotency`), so a resend of a tick whose
   first publish did get through still runs once.

After each turn that sent ticks, the leader stores the last confirmed tick of
each schedule (``periodic:<app>:state``, fenced too). A new leader reads it
and sends what fell in the gap, per each schedule's ``catch_up``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from .exceptions import BulkPublishError, ConfigurationError, MQTasksError, PublishError
from .message import PERIODIC_HEADER, Message
from .periodic import HORIZON, Schedule

if TYPE_CHECKING:
    from .app import App
    from .backend.base import Backend

__all__ = ["DEFAULT_LEASE_TTL", "ScheduleStatus", "Scheduler", "check_scheduler"]

logger = structlog.get_logger("mqtasks.scheduler")

#: Seconds the leader's lease lasts unless renewed: the longest a failover takes.
DEFAULT_LEASE_TTL = 10.0
#: Share of the lease time after the last renewal past which the leader publishes
#: nothing until it has checked its lease again (it may have been frozen).
SAFE_SHARE = 0.8
#: Longest sleep between two turns, in seconds (followers look for a free lease this often).
MAX_SLEEP = 1.0
#: A leader waiting longer than this for the next tick claims it and builds its
#: messages while it waits (seconds).
PREPARE_MARGIN = 0.05
#: Ticks published together, with their confirms pipelined.
PUBLISH_CHUNK = 500


@dataclass(frozen=True)
class ScheduleStatus:
    """One row of ``mqtasks beat --list``: a schedule and where it stands."""

    #: The schedule's name.
    name: str
    #: Its task's name.
    task: str
    #: ``cron */5 * * * * (Europe/Berlin)`` or ``every 30s``.
    schedule: str
    #: When its next tick falls (epoch seconds).
    next_run: float
    #: The last tick a leader recorded as sent (epoch seconds), or None.
    last_sent: float | None
    #: The lease holder (``host:pid:id``), or None when no scheduler leads.
    leader: str | None


def check_scheduler(app: App) -> None:
    """Refuse to schedule without a result backend or without schedules.

    Raises:
        ConfigurationError: What is missing, and how to give it.
    """
    if not app.has_backend:
        raise ConfigurationError(
            "The scheduler needs a result backend to hold its leader lease and record each "
            "tick once: pass backend='redis://...' or 'postgresql://...' to App(...), or set "
            "MQTASKS_BACKEND_URL."
        )
    if not len(app.schedules):
        raise ConfigurationError(
            f"App {app.name!r} has no periodic schedules: declare one with "
            "@app.periodic(cron=... or every=...) or app.add_periodic(task.s(...), ...)."
        )


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Scheduler:
    """Sends the ticks of ``app.schedules`` while it holds the leader lease.

    Run it with :meth:`start` / :meth:`stop` (a thread; this is how
    ``mqtasks worker --beat`` runs it beside the worker) or :meth:`run` (in
    the calling thread; ``mqtasks beat``). :meth:`turn` is one pass of the
    loop, for tests that drive the clock.

    Args:
        app: The app whose schedules to send; it needs a result backend.
        lease_ttl: Seconds the lease lasts unless renewed: a failover takes at
            most about this long (plus a second).
        owner: This scheduler's name in the lease (``host:pid:random`` by default).
        clock: Wall-clock time in epoch seconds (ticks are computed from it).
        monotonic: The clock the lease's age is measured with.

    Raises:
        ConfigurationError: No backend, no schedules, or ``lease_ttl`` not positive.
    """

    def __init__(
        self,
        app: App,
        *,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (isinstance(lease_ttl, (int, float)) and math.isfinite(lease_ttl) and lease_ttl > 0):
            raise ConfigurationError(f"lease_ttl must be positive seconds, not {lease_ttl!r}.")
        check_scheduler(app)
        self.app = app
        self.lease_ttl = float(lease_ttl)
        #: This scheduler's name in the lease.
        self.owner = owner or _owner()
        self._clock = clock
        self._monotonic = monotonic
        self._lease = f"periodic:{app.name}:leader"
        self._state_key = f"periodic:{app.name}:state"
        self._claim_prefix = f"periodic:{app.name}:sent:"
        # Renewed this often; followers look for a free lease at most MAX_SLEEP apart.
        self._renew_every = min(MAX_SLEEP, self.lease_ttl / 3)
        #: The fencing token while this scheduler leads, else None.
        self.token: int | None = None
        self._renewed_at = -math.inf
        self._last: dict[str, float] = {}
        # Ticks claimed ahead (see _prepare): id -> (token, message, resent).
        self._prepared: dict[str, tuple[int | None, Message, bool]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def backend(self) -> Backend:
        """The app's result backend, which holds the lease and the claims."""
        return self.app.backend

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a daemon thread until :meth:`stop`."""
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name="mqtasks-scheduler", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop started by :meth:`start` and give up the lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.lease_ttl + 5)
            self._thread = None

    def run(self, stop: threading.Event) -> None:
        """Turn until ``stop`` is set, then give up the lease (if held)."""
        logger.info(
            "periodic.started",
            owner=self.owner,
            schedules=len(self.app.schedules),
            lease_ttl=self.lease_ttl,
        )
        failures = 0
        try:
            while not stop.is_set():
                try:
                    pause = self.turn()
                    failures = 0
                except Exception as exc:  # a scheduler outlives any one failed turn
                    failures += 1
                    pause = min(self._renew_every * failures, self.lease_ttl / 2)
                    logger.warning(
                        "periodic.error",
                        error=str(exc),
                        retry_in=round(pause, 3),
                        owner=self.owner,
                        exc_info=not isinstance(exc, MQTasksError),
                    )
                stop.wait(pause)
        finally:
            self._release()

    def _release(self) -> None:
        if self.token is None:
            return
        self.token = None
        try:
            self.backend.release_lease(self._lease, self.owner)
        except MQTasksError as exc:
            logger.warning("periodic.release_failed", error=str(exc), owner=self.owner)
        else:
            logger.info("periodic.follower", reason="stopped", owner=self.owner)

    # -- one turn ---------------------------------------------------------------------

    def turn(self) -> float:
        """Lead if possible, send the ticks that are due; return seconds until the next turn."""
        if not self._lead():
            return self._renew_every
        now = self._clock()
        due = [(s, tick) for s in self.app.schedules for tick in s.due(self._last.get(s.name), now)]
        if due:
            self._send(due)
        now = self._clock()
        following = min((s.next_tick(now) for s in self.app.schedules), default=now + MAX_SLEEP)
        ahead = following - now
        if self.token is not None and PREPARE_MARGIN < ahead <= MAX_SLEEP and not self._prepared:
            # Claim the next tick and build its messages now, while waiting for it:
            # at the tick only the publish is left.
            self._prepare(following)
            now = self._clock()
        return max(0.0, min(following - now, self._renew_every))

    def _prepare(self, tick: float) -> None:
        """Claim the ticks falling at ``tick`` and build their messages, ahead of it."""
        ahead = [
            (s, tick)
            for s in self.app.schedules
            if s.due(self._last.get(s.name), tick)[-1:] == [tick]
        ]
        self._prepared = {}
        for schedule, _, tick_id, resent in self._claim(ahead) if ahead else []:
            message = self._message(schedule, tick, tick_id)
            self._prepared[tick_id] = (self.token, message, resent)

    def _lead(self) -> bool:
        """Hold the lease: renew it when due, else try to take it; return whether this leads."""
        backend = self.backend
        started = self._monotonic()
        if self.token is not None:
            if started - self._renewed_at < self._renew_every:
                return True
            if backend.renew_lease(self._lease, self.owner, self.lease_ttl):
                self._renewed_at = started
                return True
            self._step_down("lease_lost")
        token = backend.acquire_lease(self._lease, self.owner, self.lease_ttl)
        if token is None:
            return False
        self._renewed_at = started
        self.token = token
        raw = backend.get(self._state_key)
        self._last = _decode_state(raw)
        logger.info("periodic.leader", owner=self.owner, token=token, known=len(self._last))
        # A follower never publishes: connect and declare now, not at the first tick.
        self.app.declare(sorted(self._queues()))
        return True

    def _queues(self) -> set[str]:
        return {
            s.options.get("queue") or self.app.get_task(s.task).queue for s in self.app.schedules
        }

    def _step_down(self, reason: str) -> None:
        logger.warning("periodic.follower", reason=reason, owner=self.owner, token=self.token)
        self.token = None
        self._renewed_at = -math.inf
        self._prepared = {}

    def _claim(self, due: list[tuple[Schedule, float]]) -> list[tuple[Schedule, float, str, bool]]:
        """Claim the keys of ``due`` ticks; return ``(schedule, tick, id, resent)`` of those
        this leader is to send (none, after stepping down, when fenced off)."""
        token = self.token
        assert token is not None
        ids = [schedule.tick_id(tick) for schedule, tick in due]
        holders = self.backend.claim_fenced(
            self._lease, token, [self._claim_prefix + i for i in ids], HORIZON
        )
        if holders is None:
            self._step_down("fenced")
            return []
        chosen: list[tuple[Schedule, float, str, bool]] = []
        for (schedule, tick), tick_id, holder in zip(due, ids, holders, strict=True):
            if holder > token:
                continue  # a later leader claimed it: it is that leader's to send
            # holder < token: an earlier leader claimed it and did not record it as
            # sent (due() returns only ticks after the recorded one): send it again.
            chosen.append((schedule, tick, tick_id, holder != token))
        return chosen

    def _send(self, due: list[tuple[Schedule, float]]) -> None:
        token = self.token
        assert token is not None
        prepared, self._prepared = self._prepared, {}
        ready: dict[tuple[str, float], tuple[str, Message, bool]] = {}
        for schedule, tick in due:
            tick_id = schedule.tick_id(tick)
            if tick_id in prepared and prepared[tick_id][0] == token:
                _, message, resent = prepared[tick_id]
                ready[schedule.name, tick] = (tick_id, message, resent)
        rest = self._claim([(s, tick) for s, tick in due if (s.name, tick) not in ready])
        if self.token is None:
            return  # fenced off while claiming
        claimed = {(s.name, tick): (tick_id, resent) for s, tick, tick_id, resent in rest}
        chosen: list[tuple[Schedule, float, str, bool]] = []
        messages: list[Message] = []
        for schedule, tick in due:
            key = (schedule.name, tick)
            if key in ready:
                tick_id, message, resent = ready[key]
            elif key in claimed:
                tick_id, resent = claimed[key]
                message = self._message(schedule, tick, tick_id)
            else:
                continue
            chosen.append((schedule, tick, tick_id, resent))
            messages.append(message)
        if not chosen:
            return
        if self._monotonic() - self._renewed_at > self.lease_ttl * SAFE_SHARE:
            # Frozen (or stalled) since the last renewal: the lease may be another's
            # by now. Publish nothing; the next turn checks the lease first.
            self._step_down("frozen")
            return
        # In chunks, each timed by its own confirm: a tick's lateness is when the
        # broker had it, not when the turn's last message was confirmed.
        failed: set[str] = set()
        sent_at: dict[str, float] = {}
        for start in range(0, len(messages), PUBLISH_CHUNK):
            chunk = messages[start : start + PUBLISH_CHUNK]
            try:
                self.app.send_many(chunk)
            except BulkPublishError as exc:
                failed.update(exc.failed)
                logger.warning("periodic.publish_failed", failed=len(exc.failed), error=str(exc))
            except PublishError as exc:
                failed.update(m.id for m in chunk)
                logger.warning("periodic.publish_failed", failed=len(chunk), error=str(exc))
            confirmed = self._clock()
            for message in chunk:
                sent_at[message.id] = confirmed
        stalled: set[str] = set()
        for schedule, tick, tick_id, resent in chosen:
            if tick_id in failed or schedule.name in stalled:
                # Ticks of one schedule are recorded in order: a failed one holds
                # back the later ones (sent again next turn, under the same ids).
                stalled.add(schedule.name)
                continue
            self._last[schedule.name] = tick
            logger.info(
                "periodic.sent",
                schedule=schedule.name,
                tick_id=tick_id,
                token=token,
                late_ms=round((sent_at[tick_id] - tick) * 1000, 1),
                resent=resent,
            )
        state = json.dumps(self._last).encode()
        if not self.backend.put_fenced(self._lease, token, self._state_key, state, HORIZON):
            self._step_down("fenced")

    def _message(self, schedule: Schedule, tick: float, tick_id: str) -> Message:
        task = self.app.get_task(schedule.task)
        message = task.message(
            schedule.args, schedule.kwargs, task_id=tick_id, **dict(schedule.options)
        )
        return message.copy(headers={**message.headers, PERIODIC_HEADER: schedule.name})

    # -- reading ----------------------------------------------------------------------

    def listing(self) -> list[ScheduleStatus]:
        """Each schedule with its next run, its last recorded tick and the current leader."""
        backend = self.backend
        last = _decode_state(backend.get(self._state_key))
        holder = backend.lease_holder(self._lease)
        leader = holder[0] if holder is not None else None
        now = self._clock()
        return [
            ScheduleStatus(
                name=s.name,
                task=s.task,
                schedule=s.describe(),
                next_run=s.next_tick(now),
                last_sent=last.get(s.name),
                leader=leader,
            )
            for s in self.app.schedules
        ]


def _decode_state(raw: bytes | None) -> dict[str, float]:
    """The state record: ``{schedule name: last recorded tick}``; empty if absent or unreadable."""
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        logger.warning("periodic.state_unreadable", note="starting from now")
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        str(k): float(v)
        for k, v in data.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
