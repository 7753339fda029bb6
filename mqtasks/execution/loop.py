"""The worker's event loop: one per worker process, in a thread of its own, where
``async def`` tasks run; and the monitor that names a task holding it.

A worker thread processes a coroutine task's message as any other (decode,
middleware, retries, results); only the task's body runs here: the thread
submits the coroutine with :meth:`EventLoopThread.submit` and waits for its
outcome, so ``--concurrency`` bounds how many coroutines run at once. Each
runs as an asyncio task named ``<task name>[<task id>]`` in a copy of the
submitting thread's context (the message, the structlog and OpenTelemetry
contexts the middleware bound).

A coroutine that blocks (``time.sleep``, a CPU-bound loop) stops every other
coroutine of the loop. The monitor thread pings the loop; when a ping goes
unanswered for ``loop_block_threshold`` seconds it logs ``task.loop_blocked``
once, with the name of the asyncio task running then.
"""

from __future__ import annotations

import _thread
import asyncio
import collections
import contextvars
import itertools
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import structlog

__all__ = ["EventLoopThread", "Outcome"]

logger = structlog.get_logger("mqtasks.worker")

if TYPE_CHECKING:
    #: A coroutine submitted to the loop, with its task's name, context and callbacks.
    _Submitted = tuple[
        Coroutine[Any, Any, Any],
        str,
        contextvars.Context,
        Callable[[asyncio.Task[Any]], None],
        Callable[[asyncio.Task[Any]], bool],
    ]


class Outcome:
    """A coroutine's outcome, handed to the worker thread waiting for it.

    Set once, by the loop (the coroutine ended) or by the watchdog (the task
    was stopped): the first one wins. Lighter than a ``concurrent.futures.Future``
    (a lock, no condition), as every coroutine task makes one.
    """

    __slots__ = ("_first", "_ready", "error", "value")

    def __init__(self) -> None:
        self._ready = _thread.allocate_lock()
        self._ready.acquire()
        self._first = itertools.count().__next__  # atomic: 0 for the first caller only
        self.value: Any = None
        self.error: BaseException | None = None

    def set(self, value: Any, error: BaseException | None = None) -> bool:
        """Set the outcome, unless it is set already; return whether it was."""
        if self._first():
            return False
        self.value, self.error = value, error
        self._ready.release()
        return True

    def wait(self) -> Any:
        """Wait for the outcome; return the value or raise the error."""
        self._ready.acquire()
        if self.error is not None:
            raise self.error
        return self.value


class EventLoopThread:
    """An asyncio event loop running in a daemon thread, with a block monitor.

    Args:
        block_threshold: Seconds the loop may go unanswering before
            ``task.loop_blocked`` is logged.
    """

    def __init__(self, block_threshold: float) -> None:
        self.block_threshold = block_threshold
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="mqtasks-event-loop", daemon=True)
        self._stopped = threading.Event()
        self._monitor = threading.Thread(
            target=self._watch, name="mqtasks-loop-monitor", daemon=True
        )
        #: Whether the loop has not answered the monitor for ``block_threshold`` seconds now.
        self.blocked = False
        #: Set when the loop stops: what is cancelled then is left unsettled (redelivered).
        self.closing = False
        self._submitted: collections.deque[_Submitted] = collections.deque()
        self._wake_pending = False
        self._thread.start()
        self._monitor.start()

    @property
    def thread(self) -> threading.Thread:
        """The thread running the loop."""
        return self._thread

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                tasks = asyncio.all_tasks(self.loop)
                for task in tasks:
                    task.cancel()
                if tasks:
                    self.loop.run_until_complete(asyncio.wait(tasks, timeout=1.0))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    def submit(
        self,
        coro: Coroutine[Any, Any, Any],
        *,
        name: str,
        context: contextvars.Context,
        done: Callable[[asyncio.Task[Any]], None],
        started: Callable[[asyncio.Task[Any]], bool],
    ) -> None:
        """Run ``coro`` as an asyncio task named ``name`` in ``context``.

        Args:
            coro: The coroutine; cancelled before it runs if ``started`` refuses it.
            name: The asyncio task's name.
            context: A context no other thread runs in (a copy of the submitter's).
            done: Called in the loop once the task is done.
            started: Called in the loop with the new task before it first runs;
                returns False if it must not run (it is cancelled then).
        """
        self._submitted.append((coro, name, context, done, started))
        # One wake-up (a write to the loop's self-pipe) for what is submitted while
        # the loop has not yet taken the earlier ones; the flag is cleared before
        # the loop takes them, so nothing appended after that waits unseen.
        if not self._wake_pending:
            self._wake_pending = True
            self.loop.call_soon_threadsafe(self._start_submitted)

    def _start_submitted(self) -> None:
        """Start the submitted coroutines (in the loop)."""
        self._wake_pending = False
        submitted, loop = self._submitted, self.loop
        while submitted:
            coro, name, context, done, started = submitted.popleft()
            if sys.version_info >= (3, 11):
                task = loop.create_task(coro, name=name, context=context)
            else:  # created inside the context, the task runs in a copy of it
                task = context.run(loop.create_task, coro, name=name)
            if not started(task):
                task.cancel()
            task.add_done_callback(done)

    def call(self, fn: Callable[[], Any]) -> None:
        """Call ``fn`` in the loop's thread, soon (from any thread)."""
        self.loop.call_soon_threadsafe(fn)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what still runs, stop the loop and wait up to ``timeout`` s for its thread."""
        self.closing = True
        self._stopped.set()
        if not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:  # closed meanwhile
                pass
        self._thread.join(timeout)
        self._monitor.join(timeout)

    def abandon(self) -> None:
        """Give the loop up (a task blocks it): it stops whenever it runs again."""
        self._stopped.set()
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # closed already
            pass

    def _watch(self) -> None:
        """Ping the loop; log ``task.loop_blocked`` once per episode it does not answer."""
        threshold = self.block_threshold
        while not self._stopped.wait(threshold / 2):
            answered = threading.Event()
            sent = time.monotonic()
            try:
                self.loop.call_soon_threadsafe(answered.set)
            except RuntimeError:  # the loop is closed
                return
            if answered.wait(threshold):
                continue
            task = asyncio.current_task(self.loop)  # a dict read: safe from another thread
            self.blocked = True
            logger.warning(
                "task.loop_blocked",
                asyncio_task=task.get_name() if task is not None else None,
                blocked_for=round(time.monotonic() - sent, 3),
                threshold=threshold,
                note="a coroutine task blocks the event loop (time.sleep, CPU-bound work, "
                "blocking I/O): every other coroutine task waits; use await and "
                "asyncio.to_thread()",
            )
            while not answered.wait(threshold) and not self._stopped.is_set():
                pass
            self.blocked = False
            logger.info(
                "task.loop_unblocked",
                asyncio_task=task.get_name() if task is not None else None,
                blocked_for=round(time.monotonic() - sent, 3),
            )
