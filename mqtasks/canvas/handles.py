"""Handles of sent workflows: a chain's (the last step's) and a group's (every member's)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic

from ..exceptions import ResultTimeout
from ..result import (
    FAILURE_STATES,
    PENDING,
    SUCCEEDED,
    Outcome,
    decode_outcome,
    fetch_outcome,
    wait_outcome,
)
from ..task import TaskHandle
from .signature import R

if TYPE_CHECKING:
    from ..app import App

__all__ = ["ChainHandle", "GroupHandle"]


def _handle(app: App, task_id: str) -> TaskHandle:
    return app.handle(task_id)


@dataclass(frozen=True)
class ChainHandle(TaskHandle):
    """What a chain's ``delay()`` returns: the last step's handle, which reaches the others.

    Its :meth:`~mqtasks.handle.TaskHandle.get` is the chain's value; a failed
    step makes it raise :exc:`~mqtasks.exceptions.TaskFailed` naming that step.
    """

    #: Every step's handle, in order (the last is this one's task).
    steps: tuple[TaskHandle, ...] = field(default=(), repr=False, compare=False)

    @property
    def parent(self) -> TaskHandle | None:
        """The handle of the step before the last one (None for a one-step chain)."""
        return self.steps[-2] if len(self.steps) > 1 else None


class GroupHandle(Generic[R]):
    """What a group's ``delay()`` returns: the members' ids, and their values once stored.

    Args:
        app: The app whose result backend holds the members' outcomes.
        ids: The members' task ids (a chain member's: its last step's), in order.
    """

    __slots__ = ("app", "ids", "parent")

    def __init__(self, app: App, ids: Sequence[str], *, parent: TaskHandle | None = None) -> None:
        self.app = app
        #: The members' task ids, in order.
        self.ids: tuple[str, ...] = tuple(ids)
        #: For a group that ends a chain, the handle of the step before it.
        self.parent = parent

    def __repr__(self) -> str:
        return f"<GroupHandle of {len(self.ids)}>"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def handles(self) -> list[TaskHandle]:
        """A handle per member, in order."""
        return [_handle(self.app, i) for i in self.ids]

    def _outcomes(self) -> list[Outcome | None]:
        backend = self.app.backend
        return [
            None if stored is None else decode_outcome(stored[0])
            for stored in backend.get_results(self.ids)
        ]

    @property
    def states(self) -> list[str]:
        """Each member's state (``PENDING`` when nothing is stored), in order."""
        return [PENDING if o is None else o.state for o in self._outcomes()]

    def ready(self) -> bool:
        """Whether every member has a final outcome."""
        return all(o is not None and o.final for o in self._outcomes())

    def successful(self) -> bool:
        """Whether every member succeeded."""
        return all(o is not None and o.state == SUCCEEDED for o in self._outcomes())

    def failed(self) -> bool:
        """Whether some member ended without a value."""
        return any(o is not None and o.state in FAILURE_STATES for o in self._outcomes())

    def get(self, timeout: float | None = None, *, propagate: bool = True) -> list[R]:
        """Wait for every member; return their values, in order.

        Args:
            timeout: Seconds to wait for all of them; None waits as long as it takes.
            propagate: Raise for a failed member; if False, its place holds the
                :exc:`~mqtasks.exceptions.TaskFailed` instead of a value.

        Raises:
            TaskFailed: A member failed (the first in order), when ``propagate``.
            ResultTimeout: Not every member ended within ``timeout`` seconds.
            BackendError: The backend cannot be reached.
        """
        backend = self.app.backend
        deadline = None if timeout is None else time.monotonic() + timeout
        values: list[Any] = []
        for task_id in self.ids:
            outcome = fetch_outcome(backend, task_id)
            if outcome is None or not outcome.final:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    outcome = wait_outcome(backend, task_id, left)
                except ResultTimeout as exc:
                    done = len(values)
                    raise ResultTimeout(
                        f"The group has no final result after {timeout:g} s: {done} of "
                        f"{len(self.ids)} members ended before member {task_id}. {exc}",
                        task_id=task_id,
                        timeout=exc.timeout,
                    ) from None
            error = outcome.error(task_id)
            if error is not None:
                if propagate:
                    raise error
                values.append(error)
            else:
                values.append(outcome.value)
        return values

    async def aget(self, timeout: float | None = None, *, propagate: bool = True) -> list[R]:
        """:meth:`get` for asyncio code, waiting in a thread so the event loop keeps running."""
        return await asyncio.to_thread(self.get, timeout, propagate=propagate)
