"""Run leases: held while a copy of a ``dedupe`` workflow message runs, renewed until released.

A chord's callback may be published twice (by a member that died before its
publish was confirmed, then by its redelivery); the
:class:`~mqtasks.middleware.workflow.Workflow` middleware runs at most one
copy at a time by holding a lease on the task id in the result backend.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import structlog

from ..exceptions import MQTasksError
from ..message import _origin
from .workflow_keys import run_lease_name

if TYPE_CHECKING:
    from ..backend.base import Backend

__all__ = ["RunLeases"]

logger = structlog.get_logger("mqtasks.workflow")


class RunLeases:
    """The run leases one middleware holds, and the thread that renews them.

    Args:
        ttl: Seconds a lease lasts; renewed every third of it while held, so
            it lapses that long after a worker dies.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._leases: dict[str, tuple[Backend, str]] = {}
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    def acquire(self, backend: Backend, task_id: str) -> bool:
        """Take the lease of ``task_id`` for this thread; False if another copy holds it."""
        owner = f"{_origin()}/{threading.get_ident()}"
        if backend.acquire_lease(run_lease_name(task_id), owner, self.ttl) is None:
            return False
        with self._lock:
            self._leases[task_id] = (backend, owner)
        self._start_renewer()
        return True

    def release(self, task_id: str) -> None:
        """Release the lease of ``task_id`` if held (a failure is logged: it lapses after ttl)."""
        with self._lock:
            held = self._leases.pop(task_id, None)
        if held is None:
            return
        backend, owner = held
        try:
            backend.release_lease(run_lease_name(task_id), owner)
        except MQTasksError as exc:  # it lapses after ttl
            logger.warning("workflow.lease_release_failed", task_id=task_id, error=str(exc))

    def _start_renewer(self) -> None:
        # One thread renews every lease held; it exits once none is held
        # (setting _renewer back under the lock, so none is missed).
        with self._lock:
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew_main, name="mqtasks-workflow-leases", daemon=True
                )
                self._renewer.start()

    def _renew_main(self) -> None:
        while True:
            time.sleep(self.ttl / 3)
            with self._lock:
                held = list(self._leases.items())
                if not held:
                    self._renewer = None
                    return
            for task_id, (backend, owner) in held:
                try:
                    backend.renew_lease(run_lease_name(task_id), owner, self.ttl)
                except MQTasksError as exc:
                    logger.warning("workflow.lease_renew_failed", task_id=task_id, error=str(exc))
