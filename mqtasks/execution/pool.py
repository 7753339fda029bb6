"""The worker's thread pool: threads that take deliveries from a local queue, run
them, and post each settlement back to the I/O thread.

It grows and shrinks while the worker runs (:meth:`ThreadPool.resize`, for
autoscaling), and replaces a thread the worker gave up (a task past its hard
time limit, which Python cannot stop) by a fresh one, so the slot is free.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable

from ..processing import ABANDONED
from ..transport.base import Delivery

__all__ = ["ThreadPool"]


class ThreadPool:
    """Worker threads draining ``work``.

    Args:
        work: Deliveries to run; ``None`` tells one thread to exit.
        outcome: Runs a delivery; returns its settlement (:data:`~mqtasks.processing.ABANDONED`:
            the thread was given up, and exits without posting).
        post: Hands a ``(delivery, settlement)`` pair to the I/O thread.
    """

    def __init__(
        self,
        work: queue.SimpleQueue[Delivery | None],
        outcome: Callable[[Delivery], str],
        post: Callable[[tuple[Delivery, str]], None],
    ) -> None:
        self._work = work
        self._outcome = outcome
        self._post = post
        self._lock = threading.Lock()
        self._names = itertools.count()
        #: The threads taking work now.
        self.threads: set[threading.Thread] = set()
        #: Threads given up (see :meth:`abandon`), alive or not.
        self.abandoned: list[threading.Thread] = []

    def __len__(self) -> int:
        return len(self.threads)

    def start(self, n: int) -> None:
        """Start ``n`` more threads."""
        with self._lock:
            for _ in range(n):
                t = threading.Thread(
                    target=self._main, name=f"mqtasks-worker-{next(self._names)}", daemon=True
                )
                self.threads.add(t)
                t.start()

    def resize(self, current: int, target: int) -> None:
        """Go from ``current`` threads to ``target``: start some, or have some exit
        after their current task."""
        if target > current:
            self.start(target - current)
        for _ in range(current - target):
            self._work.put(None)

    def stop(self, join: bool) -> None:
        """Have every thread exit once the work queue is empty; wait for them if ``join``."""
        with self._lock:
            threads = list(self.threads)
        for _ in threads:
            self._work.put(None)
        if join:
            for t in threads:
                t.join(timeout=1.0)

    def abandon(self, thread: threading.Thread) -> None:
        """Give ``thread`` up (it runs a task the worker has stopped); start another."""
        with self._lock:
            self.threads.discard(thread)
            self.abandoned.append(thread)
        self.start(1)

    def abandoned_alive(self) -> int:
        """How many given-up threads still run (the others are forgotten)."""
        with self._lock:
            self.abandoned = [t for t in self.abandoned if t.is_alive()]
            return len(self.abandoned)

    def _main(self) -> None:
        get, post, outcome = self._work.get, self._post, self._outcome
        try:
            while True:
                delivery = get()
                if delivery is None:
                    return
                action = outcome(delivery)
                if action == ABANDONED:
                    return  # settled by the worker already; a fresh thread has this slot
                post((delivery, action))
                # Not kept while this thread waits for the next one: a settled
                # message's body (and the transport's copy of it) may be large.
                del delivery
        finally:
            with self._lock:
                self.threads.discard(threading.current_thread())
