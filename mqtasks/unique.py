"""Unique tasks: at most one message per key within a window, claimed in the result backend.

``apply_async(..., idempotency_key="charge-42")`` and ``@app.task(unique_for=3600)``
(the key made from the task name and its arguments) claim the key with
:meth:`Backend.set_if_absent <mqtasks.backend.base.Backend.set_if_absent>`
before the message is published, storing the new task id under it. A call that
finds the key taken publishes nothing and gets a handle for the stored id. A
publish that fails gives the key back, so that calling ``delay()`` again can
enqueue. The arguments never reach the backend or the logs: keys are SHA-256
hashes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from .exceptions import BackendError, EncodeError

if TYPE_CHECKING:
    from .backend.base import Backend

__all__ = ["KEY_PREFIX", "Claim", "argument_key", "claim", "explicit_key", "release"]

logger = structlog.get_logger("mqtasks.unique")

#: Put in front of the key hash in the backend (which adds its own prefix).
KEY_PREFIX = "unique:"

# sort_keys: the same arguments given in another keyword order make the same key.
_CANONICAL = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=True
)


def _digest(parts: list[Any]) -> str:
    return hashlib.sha256(_CANONICAL.encode(parts).encode()).hexdigest()


def argument_key(task: str, arguments: Mapping[str, Any]) -> str:
    """Return the key hash of a call of ``task`` for ``unique_for``: its name and arguments.

    Args:
        task: The task name.
        arguments: The call's arguments bound to the parameter names
            (``Signature.bind(...).arguments``), so that ``add(1, 2)`` and
            ``add(x=1, y=2)`` make the same key; with no defaults filled in,
            ``add(1)`` and ``add(1, 2)`` (``y=2`` the default) make different ones.

    Raises:
        EncodeError: An argument JSON cannot carry.
    """
    try:
        return _digest(["call", task, arguments])
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"Arguments of task {task!r} cannot be sent as JSON: {exc}") from exc


def explicit_key(task: str, idempotency_key: str) -> str:
    """Return the key hash of ``idempotency_key`` given to a call of ``task``.

    Keys are scoped to the task: the same key given to two tasks claims two keys.
    """
    return _digest(["key", task, idempotency_key])


@dataclass(frozen=True)
class Claim:
    """A uniqueness key to claim for one message: its hash and how long it holds."""

    #: The SHA-256 hex digest naming the key (logged; never the arguments).
    key: str
    #: Seconds the key is held once claimed.
    ttl: float

    @property
    def backend_key(self) -> str:
        """The key as stored (before the backend's own prefix)."""
        return KEY_PREFIX + self.key


def claim(backend: Backend, unique: Claim, task_id: str) -> str | None:
    """Claim ``unique`` for ``task_id``; return None if claimed, else the id that holds it.

    Raises:
        BackendError: The backend cannot be reached (nothing may be published then).
    """
    key = unique.backend_key
    value = task_id.encode()
    # The holder can expire between the two calls; then claim again.
    for _ in range(3):
        if backend.set_if_absent(key, value, unique.ttl):
            return None
        stored = backend.get(key)
        if stored is not None:
            return stored.decode()
    raise BackendError(f"The uniqueness key {unique.key} changed hands three times in a row.")


def release(backend: Backend, unique: Claim, task_id: str) -> None:
    """Give the key back after the publish of ``task_id`` failed; log a backend error.

    Raises nothing: the caller is raising the publish error already. If the key
    cannot be deleted, it holds until its window ends.
    """
    key = unique.backend_key
    try:
        # Only our own claim: once the window ended, another call may hold the key.
        if backend.get(key) == task_id.encode():
            backend.delete(key)
    except BackendError as exc:
        logger.error(
            "task.unique_release_failed",
            key=unique.key,
            task_id=task_id,
            error=str(exc),
            note="the key holds until its window ends; calls meanwhile publish nothing",
        )
