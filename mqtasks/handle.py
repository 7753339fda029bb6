"""TaskHandle: the handle of a sent message, its broker confirm and its result.

:class:`Confirmation` tracks whether the broker has confirmed a message sent
inside a publishing block; :class:`TaskHandle` is what ``delay()`` returns:
the message's id, that confirmation, and :meth:`~TaskHandle.get`,
:attr:`~TaskHandle.state` and the other reads of the task's result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigurationError
from .result import PENDING, SUCCEEDED, Outcome, fetch_outcome, wait_outcome
from .revoke import revoke as _revoke
from .types import Seconds, to_seconds

if TYPE_CHECKING:
    from .app import App
    from .backend.base import Backend

__all__ = ["Confirmation", "TaskHandle"]


class Confirmation:
    """Whether the broker has confirmed a message handed to a publishing block yet.

    Pending until the block (:class:`~mqtasks.publishing.Publishing`) settles
    it with the broker's answer, once, from the thread that opened the block.
    """

    __slots__ = ("_callbacks", "error", "settled")

    def __init__(self) -> None:
        #: Whether the broker's answer is in.
        self.settled = False
        #: Why the message was not enqueued; None while pending or once confirmed.
        self.error: BaseException | None = None
        self._callbacks: list[Callable[[BaseException | None], None]] = []

    def settle(self, error: BaseException | None) -> None:
        """Record the broker's answer: None when it confirmed the message."""
        self.error = error
        self.settled = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(error)

    def on_settle(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback(error)`` with the broker's answer once it is in (now if it is).

        The callback runs in the thread that settles (the one that opened the
        block) and must not raise.
        """
        if self.settled:
            callback(self.error)
        else:
            self._callbacks.append(callback)


#: What a pickled TaskHandle leaves behind (see TaskHandle.__getstate__).
_LOCAL = ("app", "confirmation")


@dataclass(frozen=True)
class TaskHandle:
    """What ``delay()`` returns: the id of a message the broker has confirmed, and its result.

    Outside a publishing block a handle exists only once the broker confirmed
    the message, so :attr:`confirmed` is always True. Inside
    ``with app.publishing():`` ``delay()`` returns before the broker answers:
    the handle is pending (:attr:`confirmed` False) until the block has the
    broker's confirm, at the latest when the block exits.

    With a result backend (``App(..., backend=...)``), :meth:`get` waits for
    what the task returned, and :attr:`state` tells where it is::

        handle = add.delay(2, 3)
        handle.get(timeout=10)  # 5, or TaskFailed, or ResultTimeout

    :meth:`App.handle(task_id) <mqtasks.app.App.handle>` makes a handle from
    an id alone (kept from an earlier ``delay()``); its :attr:`task` and
    :attr:`queue` are None, as only the id is known.
    """

    #: The message (task) id.
    id: str
    #: The task name; None for a handle made from an id (:meth:`App.handle <mqtasks.app.App.handle>`).
    task: str | None = None
    #: The queue it was published to; None for a handle made from an id.
    queue: str | None = None
    #: The pending confirm of a message sent inside a publishing block; None: confirmed.
    confirmation: Confirmation | None = field(default=None, repr=False, compare=False)
    #: The app whose result backend holds the task's result.
    app: App | None = field(default=None, repr=False, compare=False)
    #: True for the handle of an earlier message a unique call found (nothing was published).
    duplicate: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        return self.id

    def __getstate__(self) -> dict[str, Any]:
        # A pickled handle (kept in a cache, sent to another process) carries its
        # id, task and queue; the app (and its connections) and a publishing
        # block's pending confirm stay here. Unpickled,
        # it reads no result: make one with app.handle(handle.id) there.
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _LOCAL}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in _LOCAL:
            object.__setattr__(self, name, None)
        for name, value in state.items():
            object.__setattr__(self, name, value)

    @property
    def confirmed(self) -> bool:
        """Whether the broker has confirmed the message (False while pending or failed)."""
        c = self.confirmation
        return c is None or (c.settled and c.error is None)

    @property
    def pending(self) -> bool:
        """Whether the broker's answer is still awaited (only inside a publishing block)."""
        c = self.confirmation
        return c is not None and not c.settled

    @property
    def error(self) -> BaseException | None:
        """Why the message was not enqueued (a :class:`~mqtasks.exceptions.PublishError`
        as a rule); None while pending or once confirmed."""
        c = self.confirmation
        return None if c is None else c.error

    # -- the result ------------------------------------------------------------------

    def _backend(self) -> Backend:
        if self.app is None:
            raise ConfigurationError(
                f"The handle of task {self.id} has no app, so no result backend: use the "
                "handle delay() returned, or app.handle(task_id)."
            )
        return self.app.backend

    def get(self, timeout: Seconds | None = None, *, propagate: bool = True) -> Any:
        """Wait for the task's result and return it.

        Waits on the backend's notification, not by polling. A task may run
        more than once (at-least-once delivery); its first final outcome is
        the one every ``get()`` returns.

        Args:
            timeout: Seconds (or a timedelta) to wait; None waits until the result is stored.
            propagate: Raise :exc:`~mqtasks.exceptions.TaskFailed` for a task
                that ended without a value; False returns that error instead.

        Returns:
            What the task returned, as JSON decodes it (a tuple comes back a list).

        Raises:
            TaskFailed: The task ended ``DEAD_LETTERED`` (retries exhausted,
                rejected, bad input...), ``FAILED`` (its value could not be stored,
                or a workflow step before it failed) or ``REVOKED``; it carries
                the reason and the exception's type, message and traceback.
            ResultTimeout: No result within ``timeout`` seconds.
            ConfigurationError: The app has no result backend.
            BackendError: The result backend cannot be reached.
            PublishError: The message was never enqueued (a publishing block's failure).
        """
        if self.error is not None:
            raise self.error
        outcome = wait_outcome(self._backend(), self.id, to_seconds(timeout))
        failure = outcome.error(self.id)
        if failure is not None:
            if propagate:
                raise failure
            return failure
        return outcome.value

    async def aget(self, timeout: Seconds | None = None, *, propagate: bool = True) -> Any:
        """:meth:`get` for asyncio code: the wait runs in a thread, the event loop keeps running.

        Cancelling the awaiting task stops the await, not the thread's wait,
        which ends by itself at ``timeout`` or when the result arrives.

        Raises:
            TaskFailed: As for :meth:`get`.
            ResultTimeout: No result within ``timeout`` seconds.
            ConfigurationError: The app has no result backend.
            BackendError: The result backend cannot be reached.
        """
        return await asyncio.to_thread(self.get, timeout, propagate=propagate)

    def outcome(self) -> Outcome | None:
        """Return the outcome stored now (final or not), or None if there is none yet.

        Raises:
            ConfigurationError: The app has no result backend.
            BackendError: The result backend cannot be reached.
        """
        return fetch_outcome(self._backend(), self.id)

    @property
    def state(self) -> str:
        """Where the task is: ``PENDING`` (nothing stored yet), ``STARTED``,
        ``RETRYING``, ``SUCCEEDED``, ``FAILED``, ``DEAD_LETTERED`` or ``REVOKED``.

        Read from the backend at each access.
        """
        outcome = self.outcome()
        return PENDING if outcome is None else outcome.state

    def ready(self) -> bool:
        """Whether the task has a final outcome (succeeded, failed, dead-lettered or revoked)."""
        outcome = self.outcome()
        return outcome is not None and outcome.final

    def successful(self) -> bool:
        """Whether the task returned a value (``SUCCEEDED``)."""
        outcome = self.outcome()
        return outcome is not None and outcome.succeeded

    def failed(self) -> bool:
        """Whether the task ended without a value (``FAILED``, ``DEAD_LETTERED``, ``REVOKED``)."""
        outcome = self.outcome()
        return outcome is not None and outcome.failed

    @property
    def result(self) -> Any:
        """What the task returned if it has ``SUCCEEDED``; None otherwise (never waits)."""
        outcome = self.outcome()
        return outcome.value if outcome is not None and outcome.state == SUCCEEDED else None

    def revoke(self, *, terminate: bool = False) -> str:
        """Revoke the task: no worker runs it (see :meth:`App.revoke <mqtasks.app.App.revoke>`).

        Args:
            terminate: Also stop it where it is running, as its hard time limit would.

        Returns:
            Its state now: ``REVOKED``, or the final state it had reached already.

        Raises:
            ConfigurationError: The handle has no app, or the app no result backend.
            BackendError: The result backend cannot be reached.
        """
        self._backend()  # raises for a handle without an app
        assert self.app is not None
        return _revoke(self.app, self.id, terminate=terminate, task=self.task)

    def forget(self) -> None:
        """Delete the task's stored result; its state is ``PENDING`` again.

        A worker running the task still (or again) stores its outcome afterwards.

        Raises:
            ConfigurationError: The app has no result backend.
            BackendError: The result backend cannot be reached.
        """
        self._backend().forget(self.id)
