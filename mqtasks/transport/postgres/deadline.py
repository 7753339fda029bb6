"""Deadlines on a psycopg connection's calls.

psycopg's blocking calls wait on the socket with no client-side timeout, and
TCP keepalives never trip on a peer whose kernel still acknowledges: a frozen
server process, a stuck proxy or middlebox. Without a deadline, a ``delay()``
could wait far past ``publish_timeout`` and a worker could sit on a dead
connection. So one watchdog thread per process shuts down the socket of a
connection whose call outlives its deadline, which makes that call fail at once
with ``psycopg.OperationalError``; the connection is then discarded (the pool
checks it, a consumer reconnects). Written here because neither psycopg nor
psycopg_pool bound a call's time on the client side.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["DeadlineExceeded", "deadline"]


class DeadlineExceeded(Exception):
    """A call on a connection outlived its deadline; its socket was shut down."""


class _Armed:
    __slots__ = ("cancelled", "fd", "fired")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.fired = False
        self.cancelled = False


class _Watchdog:
    """One daemon thread that shuts down the sockets of calls past their deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Armed]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def arm(self, fileno: int, seconds: float) -> _Armed:
        # The socket's own descriptor may be closed and reused while the entry
        # waits: the watchdog keeps a duplicate, which names the same socket.
        armed = _Armed(os.dup(fileno))
        with self._cond:
            if self._thread is None or self._pid != os.getpid():  # a forked child starts its own
                self._heap, self._pid = [], os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="mqtasks-pg-deadlines", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._seq), armed))
            self._cond.notify()
        return armed

    def disarm(self, armed: _Armed) -> None:
        with self._cond:
            armed.cancelled = True
            if not armed.fired:
                os.close(armed.fd)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                due = self._heap[0][0] - time.monotonic()
                if due > 0:
                    self._cond.wait(due)
                    continue
                _, _, armed = heapq.heappop(self._heap)
                armed.fired = True
                # socket(fileno=) owns the duplicate and closes it; shutdown()
                # acts on the socket both descriptors name.
                with contextlib.suppress(OSError), socket.socket(fileno=armed.fd) as sock:
                    sock.shutdown(socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()


@contextlib.contextmanager
def deadline(conn: Any, seconds: float) -> Iterator[None]:
    """Bound the calls made on psycopg connection ``conn`` in this block to ``seconds``.

    Raises:
        DeadlineExceeded: The block outlived ``seconds``; ``conn`` is broken from
            then on (its socket shut down), and the error that ended the call is
            the cause.
    """
    armed = _WATCHDOG.arm(conn.fileno(), seconds)
    try:
        yield
    except BaseException as exc:
        _WATCHDOG.disarm(armed)
        if armed.fired:
            raise DeadlineExceeded(f"no answer within {seconds:g} s") from exc
        raise
    _WATCHDOG.disarm(armed)
    if armed.fired:
        # It fired as the block ended: the calls were answered, the connection is not.
        with contextlib.suppress(Exception):
            conn.close()
