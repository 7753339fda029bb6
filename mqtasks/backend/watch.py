"""The thread of a revocation watch: listen on the store's push channel, reconnect on loss.

Redis (pub/sub) and PostgreSQL (LISTEN) differ only in how they subscribe and
read a notice; each gives a ``listen`` function, and :class:`WatchThread` runs
it in a thread of its own, again after each failure (with backoff), until
closed. A listen function calls ``on_watch_connected`` once it is subscribed,
then hands over each notice, and returns when ``stopping`` is set.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import structlog

from .._url import redact
from .base import Revocation, RevocationListener

__all__ = ["POLL", "WatchThread", "decode_notice", "encode_notice"]

logger = structlog.get_logger("mqtasks.backend")

#: Longest a listen function blocks in one read, in seconds: it sees a close() only
#: between reads, and close() waits for it.
POLL = 0.25
#: Seconds before the first reconnection; doubled per failure in a row, up to :data:`_MAX_BACKOFF`.
_BACKOFF = 0.1
_MAX_BACKOFF = 5.0

#: A listen function: subscribe, call ``listener.on_watch_connected()``, hand over
#: notices until ``stopping`` is set; raise on a lost connection.
Listen = Callable[[threading.Event, RevocationListener], None]


def encode_notice(task_id: str, *, terminate: bool = False, ttl: float | None = None) -> str:
    """The text a store announces: a revocation, or (``ttl`` None) its removal."""
    notice: dict[str, Any] = {"id": task_id}
    if ttl is None:
        notice["removed"] = True
    else:
        notice["terminate"] = terminate
        notice["ttl"] = ttl
    return json.dumps(notice, separators=(",", ":"))


def decode_notice(text: str | bytes, listener: RevocationListener, prefix: str = "") -> None:
    """Hand the notice ``text`` to ``listener``; ignore one that is not a notice.

    Args:
        text: What :func:`encode_notice` made.
        listener: Whom to tell.
        prefix: Notices of ids without this prefix (another app's) are ignored;
            it is removed from the ids that have it.
    """
    try:
        notice = json.loads(text)
        task_id = notice["id"]
        if not isinstance(task_id, str) or not task_id.startswith(prefix):
            return
        task_id = task_id[len(prefix) :]
        if notice.get("removed"):
            listener.on_revocation_removed(task_id)
            return
        revocation = Revocation(task_id, bool(notice["terminate"]), float(notice["ttl"]))
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("revocations.bad_notice", error=str(exc))
        return
    listener.on_revocation(revocation)


class WatchThread:
    """Runs ``listen`` in a daemon thread until :meth:`close`, reconnecting after failures.

    Args:
        name: The thread's name.
        listen: Subscribes and hands over notices (see :data:`Listen`).
        listener: Told of the revocations.
    """

    def __init__(self, name: str, listen: Listen, listener: RevocationListener) -> None:
        self._listen = listen
        self._listener = listener
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and wait for it (no callback runs once this returns)."""
        self._stopping.set()
        if self._thread is not threading.current_thread():
            self._thread.join(POLL + 10)

    def _run(self) -> None:
        delay = _BACKOFF
        while not self._stopping.is_set():
            try:
                self._listen(self._stopping, self._listener)
                delay = _BACKOFF
            except Exception as exc:
                # Notices sent until it listens again are lost; on_watch_connected
                # makes the listener read the stored revocations then.
                logger.warning(
                    "revocations.watch_failed",
                    error=redact(f"{type(exc).__name__}: {exc}"),
                    retry_in=round(delay, 2),
                )
                self._stopping.wait(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
