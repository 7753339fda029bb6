"""One LISTEN connection per PostgreSQL backend, shared by every waiting call of the process.

A connection per waiting call would hold as many server connections as there
are callers in ``get()`` (PostgreSQL allows 100 by default). Here one thread
LISTENs and wakes the callers whose task was notified; it starts with the
first waiter and closes its connection once nobody has waited for a while.

The guarantee a waiter needs: a final record committed after its read is
notified to it. A waiter reads only once the listener is LISTENing; when the
connection is lost, every waiter is woken to read again once the listener is
back, since notifications sent in between are gone.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any

import psycopg
import structlog
from psycopg import sql

from ..base import RevocationListener
from ..watch import POLL, Listen, decode_notice

__all__ = ["Listener", "Waiter"]

logger = structlog.get_logger("mqtasks.backend.postgres")

#: Seconds the listener keeps its connection after the last waiter left.
LINGER = 10.0
#: Longest the listener thread sleeps in one wait for notifications. It sees a
#: close() only between waits, and app.close() waits for it: short, so that
#: closing costs little, while an idle wake-up a few times a second costs nothing
#: the server sees (the wait reads the socket; no query is sent).
_POLL = 0.2


class Waiter:
    """One waiting call: woken when its key is notified or the connection was lost."""

    __slots__ = ("key", "woken")

    def __init__(self, key: str) -> None:
        self.key = key
        self.woken = False


class Listener:
    """LISTEN on ``channel`` in a thread of its own; wake the :class:`Waiter` s of each payload.

    Args:
        connect: Opens an autocommit connection (the backend's parameters).
        channel: The channel final results are notified on.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], channel: str) -> None:
        self._connect = connect
        self._channel = channel
        self._cond = threading.Condition()
        self._waiters: defaultdict[str, list[Waiter]] = defaultdict(list)
        self._count = 0
        self._thread: threading.Thread | None = None
        self._listening = False
        self._error: BaseException | None = None
        self._attempt = 0
        self._stopping = False

    @contextmanager
    def waiting(self, key: str) -> Iterator[Waiter]:
        """Register a waiter for ``key`` for the duration of the block."""
        waiter = Waiter(key)
        with self._cond:
            self._waiters[key].append(waiter)
            self._count += 1
        try:
            yield waiter
        finally:
            with self._cond:
                waiters = self._waiters[key]
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[key]
                self._count -= 1

    def ready(self, waiter: Waiter, deadline: float) -> bool:
        """Wait until the listener LISTENs, then clear ``waiter``'s wake-up; False at ``deadline``.

        Read the store after this returns True: what is committed later is notified.
        Starts the listening thread if none runs (again, after a lost connection).

        Raises:
            ConnectionError: The listener's attempt to connect and LISTEN failed.
        """
        attempt: int | None = None
        with self._cond:
            while not self._listening:
                if self._thread is None and not self._stopping:
                    if attempt == self._attempt and self._error is not None:
                        error = self._error
                        raise ConnectionError(f"{type(error).__name__}: {error}") from error
                    self._start()
                if attempt is None:
                    attempt = self._attempt
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            waiter.woken = False
            return True

    def wait(self, waiter: Waiter, deadline: float) -> bool:
        """Sleep until ``waiter`` is woken (True) or ``deadline`` passes (False)."""
        with self._cond:
            while not waiter.woken:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self) -> None:
        """Stop the thread and close its connection (it restarts with the next waiter)."""
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(_POLL + 5)
        with self._cond:
            self._stopping = False
            self._cond.notify_all()

    # -- the listening thread (called with the condition held where said) ---------------

    def _start(self) -> None:
        """Start an attempt to connect and listen (condition held)."""
        self._attempt += 1
        self._error = None
        self._thread = threading.Thread(
            target=self._run, name=f"mqtasks-listen-{self._channel}", daemon=True
        )
        self._thread.start()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.woken = True
        self._cond.notify_all()

    def _run(self) -> None:
        try:
            with closing(self._connect()) as conn:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                with self._cond:
                    self._listening = True
                    self._cond.notify_all()
                idle_since = time.monotonic()
                while True:
                    with self._cond:
                        if self._stopping:
                            return
                        if self._count:
                            idle_since = time.monotonic()
                        elif time.monotonic() - idle_since > LINGER:
                            return
                    with closing(conn.notifies(timeout=_POLL)) as notifies:
                        for notify in notifies:
                            with self._cond:
                                for waiter in self._waiters.get(notify.payload, ()):
                                    waiter.woken = True
                                self._cond.notify_all()
        except Exception as exc:
            # The waiters raise it (as a BackendError) or read again after a reconnect.
            logger.warning("backend.listen_failed", channel=self._channel, error=str(exc))
            with self._cond:
                self._error = exc
        finally:
            with self._cond:
                self._listening = False
                self._thread = None
                self._wake_all()


def listen_notifies(
    connect: Callable[[], psycopg.Connection[Any]], channel: str, prefix: str
) -> Listen:
    """Return the listen function of a revocation watch thread (``mqtasks.backend.watch``).

    Unlike the result waiters' :class:`Listener`, one connection per watch, kept
    as long as the watch runs (a worker's lifetime).

    Args:
        connect: Opens an autocommit connection (the backend's parameters).
        channel: The channel revocations are notified on.
        prefix: The backend's key prefix: notices of other apps' ids are ignored.
    """

    def listen(stopping: threading.Event, listener: RevocationListener) -> None:
        with closing(connect()) as conn:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            listener.on_watch_connected()
            while not stopping.is_set():
                with closing(conn.notifies(timeout=POLL)) as notifies:
                    for notify in notifies:
                        decode_notice(notify.payload, listener, prefix)

    return listen
