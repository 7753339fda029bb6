"""Results: the outcome record a worker stores for a task, and how a handle reads it.

A backend stores bytes (:class:`~mqtasks.backend.base.Backend`); this module
alone turns an outcome into those bytes (:func:`encode_outcome`, JSON) and
back (:func:`decode_outcome`), and waits for one (:func:`wait_outcome`), so
that the worker's :class:`~mqtasks.middleware.results.Results` middleware,
:class:`~mqtasks.task.TaskHandle` and the workflow handles agree on one format::

    {"state": "SUCCEEDED", "value": 5, "task": "shop.add", "at": 1765000000.0,
     "reason": null, "error": null}

A failure carries ``"error": {"type": ..., "message": ..., "traceback": ...}``
and, for a dead letter, the ``reason``; an outcome stored for a workflow step
that did not run because another failed names that one in ``failed_task_id``.
"""

from __future__ import annotations

import json
import time
import traceback as tb
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._json import json_depth_exceeds
from ._url import redact
from .exceptions import BackendError, EncodeError, ResultTimeout, TaskFailed

if TYPE_CHECKING:
    from .backend.base import Backend

__all__ = [
    "DEAD_LETTERED",
    "FAILED",
    "FAILURE_STATES",
    "FINAL_STATES",
    "PENDING",
    "RETRYING",
    "REVOKED",
    "REVOKED_REASON",
    "STARTED",
    "STATES",
    "SUCCEEDED",
    "Outcome",
    "dead_letter_state",
    "decode_outcome",
    "encode_outcome",
    "fetch_outcome",
    "make_outcome",
    "wait_outcome",
]

#: Nothing is stored for the task (yet): queued, unknown, expired or forgotten.
PENDING = "PENDING"
#: A worker has started it (stored only for tasks with ``track_started=True``).
STARTED = "STARTED"
#: An attempt failed and the next one is scheduled.
RETRYING = "RETRYING"
#: It returned; the value is stored.
SUCCEEDED = "SUCCEEDED"
#: It cannot have a value: its value could not be stored, or a workflow step before it failed.
FAILED = "FAILED"
#: It ended in the dead-letter queue (retries exhausted, rejected, bad input...).
DEAD_LETTERED = "DEAD_LETTERED"
#: It was revoked (``revoke()``): no worker runs it; one that receives it dead-letters it.
REVOKED = "REVOKED"
#: The dead-letter reason of a revoked task; a worker stores it as ``REVOKED``.
REVOKED_REASON = "revoked"

#: Every state a record can hold (``PENDING`` is the absence of one).
STATES = frozenset({STARTED, RETRYING, SUCCEEDED, FAILED, DEAD_LETTERED, REVOKED})
#: States that end a task: the first one stored wins and never changes.
FINAL_STATES = frozenset({SUCCEEDED, FAILED, DEAD_LETTERED, REVOKED})
#: Final states without a value: ``get()`` raises :exc:`~mqtasks.exceptions.TaskFailed`.
FAILURE_STATES = FINAL_STATES - {SUCCEEDED}

#: Longest traceback kept in a record, in characters (its end: the raising frames).
MAX_TRACEBACK = 8192
#: Longest exception message kept in a record, in characters.
MAX_ERROR_MESSAGE = 2048
#: Deepest nesting of arrays and objects in a stored value.
MAX_VALUE_DEPTH = 64

#: Seconds one :meth:`Backend.wait_result` call waits when ``get()`` has no timeout;
#: the wait is renewed until the result arrives (no polling in between).
_WAIT_SLICE = 300.0

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class Outcome:
    """A task's outcome as stored: its state and its value or error.

    Built by :func:`make_outcome` (and encoded with :meth:`encode`) or by
    :func:`decode_outcome`; ``at`` is when it was made, in seconds since the epoch.
    """

    #: One of :data:`STATES`.
    state: str
    #: The task's name (None if the message could not be read).
    task: str | None = None
    #: What the task returned (``SUCCEEDED`` only), as JSON decodes it.
    value: Any = None
    #: When the outcome was stored, seconds since the epoch.
    at: float = 0.0
    #: The dead-letter reason (``max_retries_exceeded``, ``rejected``...), if any.
    reason: str | None = None
    #: The name of the exception the task raised, if any.
    error_type: str | None = None
    #: Its message (credentials masked).
    error_message: str | None = None
    #: Its formatted traceback (credentials masked, the end kept), if any.
    traceback: str | None = None
    #: The workflow member or step whose failure this outcome stands for, if not this task.
    failed_task_id: str | None = None

    @property
    def final(self) -> bool:
        """Whether this outcome ends the task (one of :data:`FINAL_STATES`)."""
        return self.state in FINAL_STATES

    @property
    def succeeded(self) -> bool:
        """Whether the task returned a value (``SUCCEEDED``)."""
        return self.state == SUCCEEDED

    @property
    def failed(self) -> bool:
        """Whether the task ended without a value (one of :data:`FAILURE_STATES`)."""
        return self.state in FAILURE_STATES

    def error(self, task_id: str) -> TaskFailed | None:
        """Return the :exc:`~mqtasks.exceptions.TaskFailed` this outcome means, or None.

        Args:
            task_id: The id the outcome is stored under; the error names
                :attr:`failed_task_id` instead when there is one.
        """
        if not self.failed:
            return None
        failed_id = self.failed_task_id or task_id
        parts = [f"Task {failed_id}"]
        if self.task:
            parts.append(f"({self.task})")
        parts.append(f"ended {self.state}")
        text = " ".join(parts)
        if self.failed_task_id and self.failed_task_id != task_id:
            text += f", so {task_id} has no result"
        if self.reason:
            text += f": {self.reason}"
        if self.error_type:
            text += f": {self.error_type}: {self.error_message or ''}".rstrip(": ")
        return TaskFailed(
            text,
            task_id=failed_id,
            state=self.state,
            reason=self.reason,
            exc_type=self.error_type,
            exc_message=self.error_message,
            traceback=self.traceback,
        )

    def raise_for_failure(self, task_id: str) -> None:
        """Raise :exc:`~mqtasks.exceptions.TaskFailed` if the task ended without a value.

        Args:
            task_id: The id the outcome is stored under.
        """
        error = self.error(task_id)
        if error is not None:
            raise error

    def encode(self, max_size: int) -> bytes:
        """Return the JSON record a backend stores for this outcome.

        Args:
            max_size: Largest record with a value, in bytes (the app's ``max_message_size``).

        Raises:
            EncodeError: The value is not JSON (str, int, float, bool, None,
                list, dict with str keys), nests too deep, or makes a record
                over ``max_size``: the task's value cannot be stored.
        """
        return _encode(self, max_size)

    def to_dict(self) -> dict[str, Any]:
        """Return the outcome as the JSON document it is stored as."""
        error = None
        if self.error_type is not None or self.error_message is not None:
            error = {
                "type": self.error_type,
                "message": self.error_message,
                "traceback": self.traceback,
            }
        document: dict[str, Any] = {
            "state": self.state,
            "value": self.value,
            "task": self.task,
            "at": self.at,
            "reason": self.reason,
            "error": error,
        }
        if self.failed_task_id is not None:
            document["failed_task_id"] = self.failed_task_id
        return document


def describe_exception(exception: BaseException) -> dict[str, str]:
    """Return the ``error`` object of a record for ``exception``: type, message, traceback.

    Credentials in the message and traceback are masked, and both are cut to
    :data:`MAX_ERROR_MESSAGE` and :data:`MAX_TRACEBACK` characters.
    """
    trace = redact("".join(tb.format_exception(exception)))
    return {
        "type": type(exception).__name__,
        "message": redact(str(exception))[:MAX_ERROR_MESSAGE],
        "traceback": trace[-MAX_TRACEBACK:],
    }


def dead_letter_state(reason: str | None) -> str:
    """Return the state of a task dead-lettered for ``reason``: ``REVOKED`` or ``DEAD_LETTERED``."""
    return REVOKED if reason == REVOKED_REASON else DEAD_LETTERED


def make_outcome(
    state: str,
    *,
    task: str | None,
    value: Any = None,
    exception: BaseException | None = None,
    reason: str | None = None,
    failed_task_id: str | None = None,
) -> Outcome:
    """Return the outcome of a task, made now; :meth:`Outcome.encode` turns it into a record.

    Its ``value`` is the object given (``SUCCEEDED`` only), not yet checked
    for JSON: encoding does that.

    Args:
        state: One of :data:`STATES`.
        task: The task's name.
        value: What the task returned (``SUCCEEDED`` only).
        exception: What the task raised, for a failure (or a retry).
        reason: The dead-letter reason, for ``DEAD_LETTERED``.
        failed_task_id: The workflow member or step that failed, when it is not this task.

    Raises:
        ValueError: ``state`` is not one of :data:`STATES`.
    """
    if state not in STATES:
        raise ValueError(f"state must be one of {sorted(STATES)}, not {state!r}")
    error = describe_exception(exception) if exception is not None else None
    return Outcome(
        state=state,
        task=task,
        value=value if state == SUCCEEDED else None,
        at=time.time(),
        reason=reason,
        error_type=error["type"] if error else None,
        error_message=error["message"] if error else None,
        traceback=error["traceback"] if error else None,
        failed_task_id=failed_task_id,
    )


def _encode(outcome: Outcome, max_size: int) -> bytes:
    """The JSON record of ``outcome`` (:meth:`Outcome.encode`)."""
    task, value = outcome.task, outcome.value
    try:
        data = _ENCODER.encode(outcome.to_dict()).encode()
    except (TypeError, ValueError) as exc:
        raise EncodeError(
            f"The value task {task!r} returned cannot be stored as JSON "
            f"({type(value).__name__}: {exc}). Return JSON types: str, int, float, bool, "
            "None, list, dict with str keys."
        ) from exc
    if outcome.state == SUCCEEDED and len(data) > max_size:
        raise EncodeError(
            f"The value task {task!r} returned encodes to {len(data)} bytes, over the "
            f"{max_size}-byte limit (max_message_size). Store the data elsewhere and return "
            "its id or URL."
        )
    if json_depth_exceeds(data, MAX_VALUE_DEPTH):
        raise EncodeError(
            f"The value task {task!r} returned is nested more than {MAX_VALUE_DEPTH - 2} "
            "levels deep. Flatten the data."
        )
    return data


def encode_outcome(
    state: str,
    *,
    task: str | None,
    value: Any = None,
    exception: BaseException | None = None,
    reason: str | None = None,
    failed_task_id: str | None = None,
    max_size: int,
) -> bytes:
    """Encode an outcome as the JSON record a backend stores.

    The same as ``make_outcome(...).encode(max_size)`` (:func:`make_outcome`).

    Args:
        state: One of :data:`STATES`.
        task: The task's name.
        value: What the task returned (``SUCCEEDED`` only).
        exception: What the task raised, for a failure (or a retry).
        reason: The dead-letter reason, for ``DEAD_LETTERED``.
        failed_task_id: The workflow member or step that failed, when it is not this task.
        max_size: Largest record with a value, in bytes (the app's ``max_message_size``).

    Raises:
        EncodeError: ``value`` is not JSON (str, int, float, bool, None, list,
            dict with str keys), nests too deep, or makes a record over
            ``max_size``: the task's value cannot be stored.
        ValueError: ``state`` is not one of :data:`STATES`.
    """
    outcome = make_outcome(
        state,
        task=task,
        value=value,
        exception=exception,
        reason=reason,
        failed_task_id=failed_task_id,
    )
    return _encode(outcome, max_size)


def decode_outcome(record: bytes) -> Outcome:
    """Parse a record made by :func:`encode_outcome`.

    Raises:
        BackendError: ``record`` is not an outcome record (the store holds
            something else under the task's key).
    """
    try:
        if json_depth_exceeds(record, MAX_VALUE_DEPTH + 2):
            raise ValueError("nested too deep")
        document = json.loads(record)
        state = document["state"]
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        error = document.get("error") or {}
        return Outcome(
            state=state,
            task=document.get("task"),
            value=document.get("value"),
            at=float(document.get("at") or 0.0),
            reason=document.get("reason"),
            error_type=error.get("type"),
            error_message=error.get("message"),
            traceback=error.get("traceback"),
            failed_task_id=document.get("failed_task_id"),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BackendError(f"a stored result is not an outcome record: {exc}") from exc


# -- what a handle does -----------------------------------------------------------------


def fetch_outcome(backend: Backend, task_id: str) -> Outcome | None:
    """Return the outcome stored for ``task_id`` (final or not), or None (``PENDING``).

    Raises:
        BackendError: The backend cannot be reached, or holds no outcome record there.
    """
    stored = backend.get_result(task_id)
    return None if stored is None else decode_outcome(stored[0])


def wait_outcome(backend: Backend, task_id: str, timeout: float | None = None) -> Outcome:
    """Return the final outcome of ``task_id`` once it is stored.

    Waits on the backend's notification (:meth:`Backend.wait_result
    <mqtasks.backend.base.Backend.wait_result>`), never by polling.

    Args:
        backend: Where the worker stores results.
        task_id: The task (message) id.
        timeout: Seconds to wait; None waits until the outcome is stored.

    Raises:
        ResultTimeout: No final outcome within ``timeout`` seconds.
        BackendError: The backend cannot be reached.
    """
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout cannot be negative, not {timeout!r}")
    if timeout is None:
        while (record := backend.wait_result(task_id, _WAIT_SLICE)) is None:
            pass
        return decode_outcome(record)
    record = backend.wait_result(task_id, timeout)
    if record is not None:
        return decode_outcome(record)
    current = fetch_outcome(backend, task_id)
    state = PENDING if current is None else current.state
    raise ResultTimeout(
        f"Task {task_id} has no final result after {timeout:g} s (state {state}): it is "
        "still queued, running or retrying, no worker consumes its queue, or its result "
        "was never stored (ignore_result, expired or forgotten).",
        task_id=task_id,
        timeout=timeout,
    )
