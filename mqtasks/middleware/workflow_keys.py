"""Workflow state keys: where the result backend keeps chords and ``dedupe`` run leases.

The client (:mod:`mqtasks.canvas`) stores a chord's member ids under
:func:`chord_ids_key` before sending it; workers'
:class:`~mqtasks.middleware.workflow.Workflow` middleware keep the rest.
"""

from __future__ import annotations

__all__ = [
    "chord_done_key",
    "chord_fired_key",
    "chord_ids_key",
    "chord_published_key",
    "run_lease_name",
]


def chord_ids_key(chord_id: str) -> str:
    """Backend key of a chord's member ids, in header order (a JSON array)."""
    return f"chord:{chord_id}:ids"


def chord_done_key(chord_id: str) -> str:
    """Backend key of the set of a chord's members that succeeded."""
    return f"chord:{chord_id}:done"


def chord_fired_key(chord_id: str) -> str:
    """Backend key claimed by the member that publishes the callback (or the errbacks)."""
    return f"chord:{chord_id}:fired"


def chord_published_key(chord_id: str) -> str:
    """Backend key set once the claimed publish is confirmed by the broker."""
    return f"chord:{chord_id}:published"


def run_lease_name(task_id: str) -> str:
    """Lease held while a copy of a ``dedupe`` message runs."""
    return f"run:{task_id}"
