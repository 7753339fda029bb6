"""Workflow schema: the checks of the JSON forms a workflow travels in.

A message's ``workflow`` member and the signatures in it come from the wire;
:class:`~mqtasks.middleware.workflow.Workflow` continues only well-formed ones,
and :meth:`Signature.from_dict() <mqtasks.canvas.Signature.from_dict>` reads
only well-formed signatures.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..message import MAX_NAME_LENGTH

__all__ = ["signature_error", "workflow_error"]


def signature_error(data: Any) -> str | None:
    """Return what is wrong with a signature's JSON form, or None if it is well formed."""
    if not isinstance(data, Mapping):
        return "a signature is not a JSON object"
    task = data.get("task")
    if not isinstance(task, str) or not 0 < len(task) <= MAX_NAME_LENGTH:
        return "'task' is not a task name"
    if not isinstance(data.get("args", []), list):
        return "'args' is not an array"
    if not isinstance(data.get("kwargs", {}), Mapping):
        return "'kwargs' is not an object"
    options = data.get("options") or {}
    if not isinstance(options, Mapping):
        return "'options' is not an object"
    queue = options.get("queue")
    if queue is not None and not isinstance(queue, str):
        return "'options.queue' is not a string"
    priority = options.get("priority")
    if priority is not None and (
        not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 255
    ):
        return "'options.priority' is not 0 to 255"
    for key in ("countdown", "expires"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"'options.{key}' is not a number"
    task_id = data.get("id")
    if task_id is not None and (not isinstance(task_id, str) or not 0 < len(task_id) <= 255):
        return "'id' is not a task id"
    errbacks = data.get("on_error") or []
    if not isinstance(errbacks, list):
        return "'on_error' is not an array"
    for errback in errbacks:
        if (problem := signature_error(errback)) is not None:
            return f"in 'on_error': {problem}"
    return None


def workflow_error(workflow: Mapping[str, Any]) -> str | None:
    """What is wrong with a message's ``workflow`` member, or None."""
    steps = workflow.get("chain", [])
    if not isinstance(steps, list):
        return "'chain' is not an array"
    for step in steps:
        if (problem := signature_error(step)) is not None:
            return f"in 'chain': {problem}"
        if not isinstance(step.get("id"), str):
            return "in 'chain': a step has no id"
    members = workflow.get("group", [])
    if not isinstance(members, list):
        return "'group' is not an array"
    for member in members:
        if (problem := signature_error(member)) is not None:
            return f"in 'group': {problem}"
        if not isinstance(member.get("id"), str):
            return "in 'group': a member has no id"
    errbacks = workflow.get("on_error", [])
    if not isinstance(errbacks, list):
        return "'on_error' is not an array"
    for errback in errbacks:
        if (problem := signature_error(errback)) is not None:
            return f"in 'on_error': {problem}"
    chord = workflow.get("chord")
    if chord is not None:
        if not isinstance(chord, Mapping):
            return "'chord' is not an object"
        cid, size, index = chord.get("id"), chord.get("size"), chord.get("index")
        if not isinstance(cid, str) or not 0 < len(cid) <= 255:
            return "'chord.id' is not a task id"
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            return "'chord.size' is not a positive integer"
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < size:
            return "'chord.index' is not within the chord"
        if (problem := signature_error(chord.get("callback"))) is not None:
            return f"in 'chord.callback': {problem}"
        if chord["callback"].get("id") != cid:
            return "'chord.callback' does not have the chord's id"
    return None
