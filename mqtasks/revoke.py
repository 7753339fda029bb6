"""Revoking tasks: a revoked task that reaches a worker is not run but dead-lettered.

:func:`revoke` (behind :meth:`App.revoke <mqtasks.app.App.revoke>`, a handle's
``revoke()`` and ``mqtasks revoke``) keeps the task id in the result backend
for ``revoke_expires`` seconds and announces it on the backend's push channel
(Redis pub/sub, PostgreSQL NOTIFY). Each worker owns a :class:`Revocations`:
it reads the live revocations when it starts, hears the new ones within a
second, and answers :meth:`Revocations.is_revoked` from a local dict, with no
backend round trip per message (but one for a revoked message, to confirm it). A revoked message is dead-lettered with the
reason ``revoked``; with ``terminate=True`` a worker running the task stops it,
as its hard time limit would.

The task's result becomes ``REVOKED`` at once (as its first final outcome, so
a task that ended already keeps its outcome), and the worker that refuses it
stores ``REVOKED`` as well. A task running when it is revoked without
``terminate`` runs to its end, but its outcome stays ``REVOKED``.

Replaying a revoked task's dead letter (``mqtasks dlq replay``) runs it:
the replay calls :func:`clear_revocation` first, which removes the revocation
(from every worker, within a second) and its ``REVOKED`` outcome.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import structlog

from ._url import redact
from .exceptions import BackendError, ConfigurationError
from .message import MAX_NAME_LENGTH
from .result import REVOKED, REVOKED_REASON, fetch_outcome, make_outcome

if TYPE_CHECKING:
    from .app import App
    from .backend.base import Backend, Revocation, Watch
    from .worker import Worker

__all__ = [
    "REASON",
    "Revocations",
    "check_task_id",
    "clear_revocation",
    "revocation_backend",
    "revoke",
]

logger = structlog.get_logger("mqtasks.revoke")

#: The dead-letter reason of a revoked task.
REASON = REVOKED_REASON
#: Seconds :meth:`Revocations.start` waits for the stored revocations to be read.
START_TIMEOUT = 10.0
#: Local revocations added between two sweeps of the expired ones.
_SWEEP_EVERY = 1024


def check_task_id(task_id: object) -> str:
    """Return ``task_id`` if it can be a task id: a string of 1 to 255 characters, no NUL.

    Any such id is accepted, also one never sent: revoking it is harmless.

    Raises:
        TypeError: It is not a string.
        ValueError: It is empty, longer than 255 characters or holds a NUL.
    """
    if not isinstance(task_id, str):
        raise TypeError(f"A task id is a string, not {type(task_id).__name__}.")
    if not 0 < len(task_id) <= MAX_NAME_LENGTH or "\x00" in task_id:
        raise ValueError(
            f"A task id has 1 to {MAX_NAME_LENGTH} characters and no NUL; "
            f"got {len(task_id)} characters: {task_id[:40]!r}."
        )
    return task_id


def revocation_backend(app: App) -> Backend:
    """Return the backend that keeps ``app``'s revocations: its result backend.

    Raises:
        ConfigurationError: The app has no result backend (the message says how to set one).
    """
    if not app.has_backend:
        raise ConfigurationError(
            f"App {app.name!r} has no result backend, so its workers cannot learn of "
            "revocations: set one with App(..., backend='redis://...' or "
            "'postgresql://...') or MQTASKS_BACKEND_URL, for the workers too."
        )
    return app.backend


def revoke(app: App, task_id: str, *, terminate: bool = False, task: str | None = None) -> str:
    """Revoke task ``task_id``: no worker runs it from now on (for ``revoke_expires`` s).

    Every worker of the app hears of it within a second; one that receives
    the task dead-letters it with the reason ``revoked``. Its outcome
    becomes ``REVOKED`` unless it has a final one already.

    Args:
        app: The app whose result backend keeps the revocation.
        task_id: The task (message) id; any id is accepted, also one never sent.
        terminate: Also stop the task where it is running, as its hard time
            limit would (its message is dead-lettered with ``revoked``).
        task: The task's name, if known (stored with the outcome).

    Returns:
        The task's state now: ``REVOKED``, or the final state it had reached
        already (``SUCCEEDED``...; a redelivery of it is refused all the same).

    Raises:
        ConfigurationError: The app has no result backend.
        TypeError, ValueError: ``task_id`` is not a task id (:func:`check_task_id`).
        BackendError: The result backend cannot be reached.
    """
    check_task_id(task_id)
    backend = revocation_backend(app)
    settings = app.settings
    # The revocation first: once REVOKED can be read, no worker runs the task.
    backend.add_revocation(task_id, terminate=terminate, ttl=settings.revoke_expires)
    record = make_outcome(REVOKED, task=task, reason=REASON).encode(settings.max_message_size)
    state = REVOKED
    if not backend.store_result(task_id, record, final=True, expires=settings.result_expires):
        stored = fetch_outcome(backend, task_id)
        state = stored.state if stored is not None else REVOKED
    logger.info("task.revoked", task_id=task_id, terminate=terminate, state=state)
    return state


def clear_revocation(app: App, task_id: str) -> None:
    """Undo :func:`revoke` for ``task_id``, so that a replay of its dead letter runs.

    The revocation is removed (every worker hears it within a second) and a
    ``REVOKED`` outcome forgotten, so the replayed task stores its own. Does
    nothing for a task that is not revoked, or without a result backend.

    Raises:
        BackendError: The result backend cannot be reached.
    """
    if not app.has_backend:
        return
    backend = app.backend
    backend.remove_revocation(task_id)
    outcome = fetch_outcome(backend, task_id)
    if outcome is not None and outcome.state == REVOKED:
        backend.forget(task_id)


class Revocations:
    """The revoked task ids a worker refuses to run, kept current from the result backend.

    :meth:`start` watches the backend's push channel, then reads the live
    revocations; each new one arrives within a second, and after a lost
    connection they are read again. :meth:`is_revoked` is a dict lookup (and a
    confirmation in the store for a revoked id).
    A revocation with ``terminate`` stops the task if it runs here
    (``worker.terminate(task_id, reason="revoked")``). Entries expire with
    their revocation.

    Args:
        worker: The worker it serves; its app must have a result backend.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._backend = worker.app.backend
        #: Revoked task id -> the monotonic time it expires. Replaced whole on each
        #: read of the store, so a lookup needs no lock.
        self._until: dict[str, float] = {}
        #: While the store is read: the task ids a notice changed since the read
        #: began (it may not know of them); None between reads.
        self._changed: set[str] | None = None
        self._notices = 0
        self._lock = threading.Lock()
        self._reading = threading.Lock()
        self._loaded = threading.Event()
        self._watch: Watch | None = None
        #: Between start() and stop(): revocations with ``terminate`` stop tasks.
        self._running = False
        self._stopped = False

    def __repr__(self) -> str:
        return f"<Revocations {len(self._until)} ids>"

    def __len__(self) -> int:
        return len(self._until)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Watch for revocations, and wait up to ``timeout`` s until the stored ones are read.

        If they cannot be read by then, the worker starts all the same (an
        error is logged) and the watch reads them once the backend answers.
        """
        self._watch = self._backend.watch_revocations(self)
        if not self._loaded.wait(timeout):
            logger.error(
                "revocations.not_loaded",
                timeout=timeout,
                note="revoked tasks may run until the result backend answers",
            )
        self._running = True

    def stop(self) -> None:
        """Stop watching; nothing is terminated afterwards."""
        self._running = False
        self._stopped = True
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    def is_revoked(self, task_id: str) -> bool:
        """Whether ``task_id`` is revoked: a dict lookup, and no backend round trip but
        for a revoked id.

        A revoked id is checked in the store once more: its dead letter may
        have been replayed a moment ago (:func:`clear_revocation`), before the
        removal reached this worker, and the replay is to run. If the store
        cannot answer, it counts as revoked.
        """
        until = self._until.get(task_id)
        if until is None or until <= time.monotonic():
            return False
        try:
            if self._backend.revocation(task_id) is not None:
                return True
        except BackendError as exc:
            logger.warning(
                "revocation.unconfirmed", task_id=task_id, error=str(exc), note="refused"
            )
            return True
        self.on_revocation_removed(task_id)
        return False

    # -- what the watch tells (RevocationListener) -----------------------------------------

    def on_revocation(self, revocation: Revocation) -> None:
        """Add a revocation just announced; stop the task here if it says ``terminate``."""
        if self._stopped:
            return
        task_id = revocation.task_id
        with self._lock:
            if self._changed is not None:
                self._changed.add(task_id)
            self._until[task_id] = time.monotonic() + revocation.expires
            self._notices += 1
            if self._notices % _SWEEP_EVERY == 0:
                self._sweep()
        logger.info("revocation.received", task_id=task_id, terminate=revocation.terminate)
        if revocation.terminate and self._running:
            self._terminate(task_id)

    def on_revocation_removed(self, task_id: str) -> None:
        """Forget a revocation just removed (its task is replayed)."""
        if self._stopped:
            return
        with self._lock:
            if self._changed is not None:
                self._changed.add(task_id)
            self._until.pop(task_id, None)

    def on_watch_connected(self) -> None:
        """(Re)read the stored revocations: notices sent while not listening are lost.

        Raises:
            BackendError: The store cannot be read (the watch then connects again).
        """
        if self._stopped:
            return
        with self._reading:
            since: set[str] = set()
            with self._lock:
                self._changed = since
            try:
                found = self._backend.revocations()
            except BaseException:
                with self._lock:
                    self._changed = None
                raise
            now = time.monotonic()
            with self._lock:
                self._changed = None
                # What a notice changed since the read began stays as the notice left it.
                fresh = {tid: until for tid, until in self._until.items() if tid in since}
                for r in found:
                    if r.task_id not in since:
                        fresh[r.task_id] = now + r.expires
                new = [r.task_id for r in found if r.terminate and r.task_id not in self._until]
                self._until = fresh
        self._loaded.set()
        logger.debug("revocations.loaded", count=len(fresh))
        if self._running:
            # Announced while the watch was not listening: stop them now.
            for task_id in new:
                self._terminate(task_id)

    # -- helpers -----------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Drop the expired entries (lock held)."""
        now = time.monotonic()
        self._until = {tid: until for tid, until in self._until.items() if until > now}

    def _terminate(self, task_id: str) -> None:
        try:
            stopped = self.worker.terminate(task_id, reason=REASON)
        except Exception as exc:  # never let a worker's failure stop the watch
            logger.error(
                "revocation.terminate_failed",
                task_id=task_id,
                error=redact(f"{type(exc).__name__}: {exc}"),
            )
            return
        if stopped:
            logger.warning("task.terminated", task_id=task_id, reason=REASON)
