"""Queue resolution: which configuration a queue name gets, how often its messages
may be delivered, and which queues an app's tasks publish to.

:class:`~mqtasks.app.App` delegates its queue helpers (:meth:`App.queue
<mqtasks.app.App.queue>`, :meth:`App.delivery_limit <mqtasks.app.App.delivery_limit>`,
:meth:`App.task_queues <mqtasks.app.App.task_queues>`) here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .ordering.queues import partition_spec
from .transport import QueueSpec
from .transport.base import DLQ_SUFFIX

if TYPE_CHECKING:
    from .app import App

__all__ = ["delivery_limit", "queue_spec", "task_queues"]


def queue_spec(app: App, name: str) -> QueueSpec:
    """Return the configuration of queue ``name``: the app's, or the defaults if not configured.

    A partition of an ordered tasks' queue gets that queue's (:mod:`mqtasks.ordering`).
    """
    spec = app.queues.get(name)
    return spec if spec is not None else partition_spec(app, name) or QueueSpec(name)


def delivery_limit(app: App, name: str) -> int | None:
    """Return the most deliveries a message of queue ``name`` gets; None: no limit.

    The queue's ``QueueSpec.delivery_limit`` if it sets one (0: none), else
    :attr:`Settings.delivery_limit <mqtasks.config.Settings.delivery_limit>`.
    Dead-letter queues have none.
    """
    if name.endswith(DLQ_SUFFIX):
        return None
    spec = app.queues.get(name)
    limit = spec.delivery_limit if spec is not None else None
    if limit is None:
        limit = app.settings.delivery_limit
    return limit or None


def task_queues(app: App) -> list[str]:
    """Return the names of all queues that ``app``'s registered tasks publish to.

    The app's ``default_queue`` alone when it has no tasks.
    """
    names = dict.fromkeys(t.queue for t in app.tasks.values())
    return list(names) or [app.settings.default_queue]
