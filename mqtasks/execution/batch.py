"""Batch consumption: the deliveries of a batch task (``@app.task(batch_size=...)``)
are collected, unacknowledged, and its function runs once on the list of their items.

A worker thread that processes a delivery of a batch task checks it as any
(decoded, known, not expired, not revoked, one positional argument: the
item), hands it to :class:`Batches` and is free at once
(:func:`~mqtasks.processing.process` returns :data:`~mqtasks.processing.BATCHED`,
not a settlement: each message of a batch is settled when the batch has run).
There is one batch being collected per task name. It runs:

* when it is full (``batch_size`` items): on the worker thread that added the
  last item, which is busy with it, as with any task;
* when ``batch_wait`` seconds have passed since its first item arrived: the
  collector's thread, which only keeps time, puts a ticket (:class:`BatchDue`)
  in the worker's work queue, and the next free worker thread runs it.

So a running batch takes one worker thread: it counts as one running task
against ``concurrency``, and waiting for items takes none.

Each message keeps its own context from the moment it was handed over: the
``before_process`` hooks of every item run, in its context, just before the
function is called (a middleware that skips one, a deferral, leaves it out of
the batch); then the function is called with the items; then each message is
concluded on its own (:func:`~mqtasks.processing.conclude`: its
``after_process`` hooks, the deciding :class:`~mqtasks.middleware.retries.Retries`
with that message's attempt), with the outcome of its item: none (acked) when
the function returned, its own exception for an item listed in
:exc:`~mqtasks.exceptions.BatchFailures`, and the function's exception for every
item when it raised anything else.

At shutdown the messages of batches not yet started (collecting, or waiting for
a thread) are handed back to the broker like deliveries no thread has started
(:meth:`Batches.close`); a running batch finishes within the worker's grace. A
killed worker's held messages are delivered again by the broker.
"""

from __future__ import annotations

import contextvars
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from ..exceptions import BatchFailures, SkipMessage
from ..processing import ACK, BATCHED, DROP, REJECT, REQUEUE, conclude
from ..transport.base import Delivery

if TYPE_CHECKING:
    from ..message import Message
    from ..processing import Job
    from ..task import Task
    from ..worker import Worker

__all__ = ["Batch", "BatchDue", "Batches", "Item"]

logger = structlog.get_logger("mqtasks.worker")


@dataclass(slots=True)
class Item:
    """One message of a batch: its delivery, decoded message, job and context."""

    delivery: Delivery
    message: Message
    job: Job
    #: The message's context (its job), where its hooks and settlement run.
    context: contextvars.Context
    #: What its ``before_process`` hooks left in the middleware's thread-locals.
    state: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class Batch:
    """The messages of one batch of ``task``, collected until ``deadline`` or until full."""

    task: Task[Any, Any]
    #: When it runs with what it has (monotonic).
    deadline: float
    items: list[Item] = field(default_factory=list)


class BatchDue(Delivery):
    """Not a message: a ticket in the worker's work queue for a batch whose
    ``batch_wait`` has passed; the worker thread that takes it runs the batch."""

    __slots__ = ("batch",)

    def __init__(self, batch: Batch) -> None:
        super().__init__(b"", batch.task.queue, -1, message_id=f"batch:{batch.task.name}")
        self.batch = batch


class Batches:
    """The batches a worker collects, one per batch task, and the thread keeping their time."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._cond = threading.Condition(threading.Lock())
        #: The batch being collected, by task name.
        self._open: dict[str, Batch] = {}
        #: Batches whose ticket is in the work queue, not taken by a thread yet.
        self._queued: list[Batch] = []
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> int:
        """Messages held in batches not started yet."""
        with self._cond:
            return sum(len(b.items) for b in (*self._open.values(), *self._queued))

    def add(self, task: Task[Any, Any], message: Message, job: Job) -> str:
        """Add ``message`` to ``task``'s batch (worker thread, in the message's context).

        Returns :data:`~mqtasks.processing.BATCHED` (settled once its batch has
        run; a batch it fills runs here first), or
        :data:`~mqtasks.processing.REQUEUE` when the worker is stopping.
        """
        flow = task.flow
        assert flow.batch_size is not None and flow.batch_wait is not None
        item = Item(job.delivery, message, job, contextvars.copy_context())
        with self._cond:
            if self._closed:
                return REQUEUE
            batch = self._open.get(task.name)
            if batch is None:
                batch = Batch(task, time.monotonic() + flow.batch_wait)
                self._open[task.name] = batch
                self._start()
                self._cond.notify()
            batch.items.append(item)
            full = len(batch.items) >= flow.batch_size
            if full:
                del self._open[task.name]
        if full:
            # A context of its own: the function's is none of its messages'.
            contextvars.Context().run(self._run, batch)
        return BATCHED

    def run_due(self, ticket: BatchDue) -> str:
        """Run the batch of ``ticket`` (worker thread); :data:`~mqtasks.processing.BATCHED`."""
        with self._cond:
            if not any(b is ticket.batch for b in self._queued):
                return BATCHED  # handed back at shutdown already
            self._queued = [b for b in self._queued if b is not ticket.batch]
        worker = self.worker
        with worker._lock:
            worker._running += 1
        try:
            contextvars.Context().run(self._run, ticket.batch)
        except BaseException:  # pragma: no cover - _run settles every item itself
            logger.exception("worker.process_crashed", message_id=ticket.message_id)
        finally:
            with worker._lock:
                worker._running -= 1
        return BATCHED

    def close(self) -> list[Delivery]:
        """Stop collecting (I/O thread, at shutdown); return the deliveries of the
        batches not started, for the worker to hand back."""
        with self._cond:
            self._closed = True
            batches = [*self._open.values(), *self._queued]
            self._open.clear()
            self._queued.clear()
            self._cond.notify()
        held = [item.delivery for batch in batches for item in batch.items]
        if held:
            logger.info("batch.handed_back", messages=len(held))
        return held

    # -- the collector's thread -----------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="mqtasks-batches", daemon=True)
            self._thread.start()

    def _main(self) -> None:
        """Queue a ticket for each batch whose ``batch_wait`` has passed."""
        work = self.worker._work
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for batch in [b for b in self._open.values() if b.deadline <= now]:
                    del self._open[batch.task.name]
                    self._queued.append(batch)
                    work.put(BatchDue(batch))
                nearest = min((b.deadline for b in self._open.values()), default=None)
                self._cond.wait(None if nearest is None else max(0.0, nearest - now))

    # -- running a batch -------------------------------------------------------------------

    def _run(self, batch: Batch) -> None:
        """Run the hooks, the function once, and settle each message (a worker thread)."""
        worker = self.worker
        post = worker._post
        consumer = worker._consumer
        locals_ = _ThreadLocals(worker)
        live: list[Item] = []
        for item in batch.items:
            delivery = item.delivery
            if consumer is not None and delivery.generation != consumer.generation:
                post((delivery, DROP))  # its connection is gone: the broker delivers it again
            elif worker._stopping.is_set():
                post((delivery, REQUEUE))
            elif self._started(item):
                item.state = locals_.save()
                live.append(item)
            locals_.reset()
        if not live:
            return
        task = batch.task
        started = time.monotonic()
        error = self._call(task, live)
        outcomes = _outcomes(error, len(live), task.name)
        logger.info(
            "batch.ran",
            task_name=task.name,
            size=len(live),
            failed=sum(1 for o in outcomes if o is not None),
            duration=round(time.monotonic() - started, 6),
        )
        for item, outcome in zip(live, outcomes, strict=True):
            locals_.restore(item.state)
            try:
                action = item.context.run(
                    conclude, worker, item.delivery, item.message, None, outcome
                )
            except Exception:  # pragma: no cover - conclude() handles hook errors
                logger.exception("worker.process_crashed", message_id=item.delivery.message_id)
                action = REJECT
            post((item.delivery, action))
        locals_.reset()

    def _started(self, item: Item) -> bool:
        """Run ``item``'s ``before_process`` hooks; False if one skipped it (settled then)."""
        worker = self.worker
        try:
            item.context.run(worker._hooks.before_process, worker, item.message)
        except SkipMessage:
            worker._post((item.delivery, item.job.action or ACK))
            return False
        return True

    def _call(self, task: Task[Any, Any], live: list[Item]) -> BaseException | None:
        """Call the function on the items (a coroutine on the worker's loop); its error."""
        first = live[0]
        # The call as one message of its own (its id is no message's: terminate()
        # of an item's id does not reach it); soft_time_limit applies to the batch.
        call = first.message.copy(
            id=f"{first.message.id}+batch", args=([i.message.args[0] for i in live],), kwargs={}
        )
        _result, error, _abandoned = self.worker._execution.execute(first.job, call, task)
        # (Never abandoned: a batch task has no hard time limit, validation refuses it.)
        return error


class _ThreadLocals:
    """The :class:`threading.local` attributes of the worker's middleware, whose
    per-message state is swapped here for each message of a batch.

    Middleware may keep a message's state in a thread-local from its
    ``before_process`` to its ``after_process`` (:class:`~mqtasks.middleware.Middleware`
    says so): one thread runs the hooks of a whole batch, all ``before_process``
    first, so each message's state is saved after its ``before_process`` and put
    back before its ``after_process``, as if each had a thread of its own.
    """

    def __init__(self, worker: Worker) -> None:
        self._locals = [
            value
            for mw in worker._hooks.middleware
            for value in getattr(mw, "__dict__", {}).values()
            if isinstance(value, threading.local)
        ]
        #: The thread's own state before the batch, put back between messages and at the end.
        self._base = self.save()

    def save(self) -> list[dict[str, Any]]:
        """A copy of what the thread-locals hold now (for this thread)."""
        return [dict(vars(local)) for local in self._locals]

    def restore(self, state: list[dict[str, Any]]) -> None:
        """Make the thread-locals hold ``state`` (from :meth:`save`)."""
        for local, saved in zip(self._locals, state, strict=True):
            held = vars(local)
            held.clear()
            held.update(saved)

    def reset(self) -> None:
        """Put back the thread's own state from before the batch."""
        self.restore(self._base)


def _outcomes(error: BaseException | None, n: int, name: str) -> list[BaseException | None]:
    """The outcome of each of ``n`` items once the function ended with ``error``."""
    if error is None:
        return [None] * n
    if not isinstance(error, BatchFailures):
        return [error] * n
    outcomes: list[BaseException | None] = [None] * n
    for index, exc in error.failures.items():
        if isinstance(index, int) and 0 <= index < n and isinstance(exc, BaseException):
            outcomes[index] = exc
        else:
            logger.warning(
                "batch.bad_failure",
                task_name=name,
                index=index,
                note=f"BatchFailures needs item indexes 0..{n - 1} with exceptions; ignored",
            )
    return outcomes
