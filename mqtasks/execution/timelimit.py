"""The deadlines of running tasks: one watchdog thread per worker, and the
asynchronous exceptions that reach a task running in a thread.

A worker whose tasks have no time limit starts no watchdog, and a task with no
limit schedules nothing: with limits off, a task costs nothing more. With
limits on, starting a task pushes its deadlines onto a heap (no thread, no
timer per task); the watchdog sleeps until the earliest one and calls back
for each that is due while its task still runs. Deadlines of tasks that ended
stay in the heap until due, or until the heap is compacted.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

__all__ = ["HARD", "SOFT", "Watchdog", "clear_async_exception", "raise_in_thread"]

logger = structlog.get_logger("mqtasks.worker")

#: Kinds of deadline.
SOFT, HARD, CHECK = "soft", "hard", "check"

#: Heap sizes below this are never compacted. Small: a deadline left in the heap keeps
#: its task's message and context alive, which the garbage collector then walks.
_COMPACT_FLOOR = 64


def raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> bool:
    """Have thread ``thread_id`` raise ``exc_type`` at the next Python line it runs.

    No library does this (Celery's thread pool has no time limits; its
    prefork pool kills processes): CPython's ``PyThreadState_SetAsyncExc`` is
    the only way to interrupt another thread. It is delivered between
    bytecodes, never inside a blocking C call (``time.sleep``, a socket read); on
    some CPython versions it may surface just outside the ``try`` that was running
    (cpython#139622), which is why :meth:`~mqtasks.execution.running.Execution.execute`
    catches one arriving as the task ends.
    Callers hold the lock that says the task is still running, so it never
    reaches a thread that has moved on to other work (see :func:`clear_async_exception`).

    Returns:
        Whether the thread was found.
    """
    set_async = ctypes.pythonapi.PyThreadState_SetAsyncExc
    found = set_async(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
    if found > 1:  # pragma: no cover - CPython's documented misuse case
        set_async(ctypes.c_ulong(thread_id), None)
        return False
    return bool(found)


def clear_async_exception(thread_id: int) -> None:
    """Withdraw an asynchronous exception set on ``thread_id`` and not yet raised."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)


class Watchdog:
    """A heap of deadlines and the thread that calls back when each is due.

    Args:
        fire: Called in the watchdog thread with ``(kind, item)`` for each due
            deadline; an exception it raises is logged, the watchdog goes on.
        live: Whether a deadline's item still matters (its task still runs):
            deadlines of items no longer live are dropped unfired.
    """

    def __init__(self, fire: Callable[[str, Any], None], live: Callable[[Any], bool]) -> None:
        self._fire = fire
        self._live = live
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._compact_at = _COMPACT_FLOOR
        self._stopped = False
        self._thread: threading.Thread | None = None

    def schedule(self, at: float, kind: str, item: Any) -> None:
        """Call back ``(kind, item)`` at monotonic time ``at`` (if ``item`` is live then)."""
        with self._cond:
            heap = self._heap
            if len(heap) >= self._compact_at:
                live = self._live
                heap[:] = [d for d in heap if d[2] == CHECK or live(d[3])]
                heapq.heapify(heap)
                self._compact_at = max(_COMPACT_FLOOR, 2 * len(heap))
            heapq.heappush(heap, (at, next(self._seq), kind, item))
            if heap[0][0] == at:  # a new earliest: the thread sleeps until a later one
                if self._thread is None:
                    self._start()
                self._cond.notify()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="mqtasks-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; deadlines not yet due never fire."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _main(self) -> None:
        heap = self._heap
        while True:
            with self._cond:
                while not self._stopped:
                    now = time.monotonic()
                    if heap and heap[0][0] <= now:
                        break
                    self._cond.wait(heap[0][0] - now if heap else None)
                if self._stopped:
                    return
                _, _, kind, item = heapq.heappop(heap)
            if kind != CHECK and not self._live(item):
                continue
            try:
                self._fire(kind, item)
            except Exception:  # the watchdog must outlive any one task
                logger.exception("worker.watchdog_failed", kind=kind)
