"""Canvas: signatures, and the workflows built from them: chain, group and chord.

A :class:`Signature` is a task call to send later (``add.s(1, 2)``). A
:func:`chain` runs signatures one after another, each getting the previous
step's value as its first argument; a :func:`group` runs them side by side; a
:func:`chord` runs a group, then a callback with the list of their values.

Nothing polls: every step's id is chosen when the workflow is sent, what comes
next travels in each message (the body's ``workflow`` member), and the
worker's :class:`~mqtasks.middleware.workflow.Workflow` middleware publishes
it when a step ends, from the outcome the result backend stored. Workflows
therefore need a result backend (``App(..., backend=...)``).

The package keeps one concept per module: :mod:`~mqtasks.canvas.signature`
(a task call to send later), :mod:`~mqtasks.canvas.workflows` (chain, group,
chord), :mod:`~mqtasks.canvas.handles` (what sending a chain or group returns).
"""

from __future__ import annotations

from .handles import ChainHandle, GroupHandle
from .signature import Signature
from .workflows import Chain, ChainGroup, Chord, Group, chain, chord, group

__all__ = [
    "Chain",
    "ChainGroup",
    "ChainHandle",
    "Chord",
    "Group",
    "GroupHandle",
    "Signature",
    "chain",
    "chord",
    "group",
]
