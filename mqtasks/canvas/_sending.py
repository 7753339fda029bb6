"""What sending any workflow shares: new ids, the app and result backend it runs on.

Every shape of :mod:`mqtasks.canvas` checks its arguments against a
placeholder for the value a step will get, runs on one app, needs that app's
result backend, and publishes its first messages the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from ..app import App
    from ..backend.base import Backend
    from ..message import Message
    from .signature import Signature


class _Parent:
    """Stands for a value a step will get from the workflow, when its arguments are checked."""

    def __repr__(self) -> str:
        return "<previous result>"


_PARENT = _Parent()


def _new_id() -> str:
    return str(uuid.uuid4())


def _backend_of(app: App, what: str) -> Backend:
    """The app's result backend; a ConfigurationError saying ``what`` needs one if none."""
    try:
        return app.backend
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"{what} needs a result backend, where workers keep the workflow's state: {exc}"
        ) from None


def _one_app(signatures: Iterable[Signature[Any]], what: str) -> App:
    """The app every signature's task belongs to.

    Raises:
        ValueError: No signature at all.
        ConfigurationError: Tasks of two apps: a workflow runs on one app's
            broker and backend.
    """
    app: App | None = None
    first: Signature[Any] | None = None
    for sig in signatures:
        if app is None:
            app, first = sig.task.app, sig
        elif sig.task.app is not app:
            assert first is not None
            raise ConfigurationError(
                f"The {what} mixes tasks of two apps: {first.name} of {first.task.app!r} and "
                f"{sig.name} of {sig.task.app!r}. A workflow is sent through one app's broker "
                "and its state kept in that app's result backend: register every task on one app."
            )
    if app is None:
        raise ValueError(f"The {what} has no signature.")
    return app


def _send_all(app: App, messages: list[tuple[Message, float | None]]) -> None:
    """Publish ``messages``: pipelined in one ``send_many``, those with a countdown one by one."""
    now = [m for m, countdown in messages if not countdown]
    if now:
        app.send_many(now)
    for message, countdown in messages:
        if countdown:
            task = app.tasks.get(message.task)
            app.send(message, names=task._names if task else None, delay=countdown)
