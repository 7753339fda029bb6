"""Workflow steps: publishing a step from its JSON form, and the records of steps not run.

What :class:`~mqtasks.middleware.workflow.Workflow` sends and stores when a
step ends: the next step's message, a chord's values for its callback, a
FAILED record for each step a failure stops.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from ..message import Message
from ..result import FAILED, SUCCEEDED, Outcome, decode_outcome, encode_outcome
from .workflow_keys import chord_ids_key

if TYPE_CHECKING:
    from ..app import App
    from ..backend.base import Backend

__all__ = ["failure_record", "member_values", "publish_step"]


def member_values(backend: Backend, cid: str, size: int) -> list[Any] | None:
    """The chord members' values in header order; None if one is not stored."""
    raw = backend.get(chord_ids_key(cid))
    if raw is None:
        return None
    ids = json.loads(raw)
    if not isinstance(ids, list) or len(ids) != size:
        return None
    values: list[Any] = []
    for stored in backend.get_results(ids):
        if stored is None:
            return None
        outcome = decode_outcome(stored[0])
        if outcome.state != SUCCEEDED:
            return None
        values.append(outcome.value)
    return values


def failure_record(task: str, outcome: Outcome, failed_id: str, max_size: int) -> bytes:
    """A FAILED record for a step that will not run because ``failed_id`` failed."""
    record = outcome.to_dict()
    record.update(state=FAILED, task=task, value=None, failed_task_id=failed_id)
    data = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) > max_size:  # a long traceback: keep the error's type and message
        data = encode_outcome(
            FAILED, task=task, reason=outcome.reason, failed_task_id=failed_id, max_size=max_size
        )
    return data


def publish_step(
    app: App, signature: Mapping[str, Any], args: list[Any], workflow: dict[str, Any]
) -> None:
    """Publish a step of a workflow from its JSON form, confirmed.

    Raises:
        PublishError: The broker did not take it.
        EncodeError: Its arguments (a value a step returned) cannot be sent.
    """
    options = signature.get("options") or {}
    errbacks = signature.get("on_error") or []
    if errbacks and "on_error" not in workflow:
        workflow = {**workflow, "on_error": errbacks}
    expires = options.get("expires")
    now = datetime.now(timezone.utc)
    message = Message(
        id=signature["id"],
        task=signature["task"],
        queue=options.get("queue") or app.settings.default_queue,
        args=tuple(args),
        kwargs=dict(signature.get("kwargs") or {}),
        priority=options.get("priority"),
        expires_at=None if expires is None else now + timedelta(seconds=expires),
        workflow=workflow or None,
    )
    task = app.tasks.get(message.task)
    countdown = options.get("countdown")
    app.send(message, names=task._names if task else None, delay=countdown or None)
