"""Pipelined publishing: ``with app.publishing():`` for one thread, ``await task.adelay()``.

``delay()`` returns once the broker has confirmed the message, one round trip
per call. A script that enqueues a backlog, or a request handler that sends a
few tasks, can choose to wait once for many confirms instead:

* **The block.** :meth:`App.publishing() <mqtasks.app.App.publishing>` returns
  a :class:`Publishing`, a context manager bound to its app and to the thread
  that enters it (through a ``contextvars.ContextVar`` holding the open
  blocks). Inside it, ``delay()``/``apply_async()`` of a task of that app run
  the same checks as always (argument binding, the ``before_publish``
  middleware, encoding and size checks raise at the call), then hand the
  encoded message to the block and return a pending
  :class:`~mqtasks.task.TaskHandle` at once. The block publishes as it goes
  through the transports' pipelined bulk path (``Transport.publish_many``,
  the one :meth:`App.send_many <mqtasks.app.App.send_many>` uses), on one
  thread of its own: when nothing is in flight the messages produced so far
  leave at once, otherwise they gather until the batch in flight is confirmed
  or ``window`` of them wait. At most two batches are handed over and
  unconfirmed; beyond that ``delay()`` waits (back pressure). The middleware's
  ``after_publish``/``after_publish_error`` hooks run in the thread that
  opened the block, as its handles are settled (during later ``delay()``
  calls, at the latest at exit), so hooks that keep per-thread state
  (tracing spans) see the thread that ran ``before_publish``. At exit the block waits
  for every confirm and raises
  :class:`~mqtasks.exceptions.BulkPublishError` naming every id not enqueued.
  A crash inside the block can lose only the block's unconfirmed messages.
* **Where the block applies.** Only to tasks of its app, sent from its thread:
  another app's task, or a call from another thread (a thread that inherited
  the context, such as ``asyncio.to_thread``), publishes and waits as
  always. Nested blocks each confirm their own messages at their own exit.
  Delayed messages (``countdown``/``eta``) go through the bulk path when the
  transport's ``publish_many`` takes ``delays=`` (``redis://``), else one by
  one with their delay (the delay is never dropped).
* **The body raises.** What it produced before is still published and waited
  for; the body's exception then propagates, unless messages were not
  enqueued, when the block raises ``BulkPublishError`` (whose ``__context__``
  is the body's exception).
* **asyncio.** :meth:`Task.adelay() <mqtasks.task.Task.adelay>` returns once its
  message is confirmed. A batcher per event loop collects the calls made in
  one iteration of the loop and publishes them with the same bulk path in a
  thread (``asyncio.to_thread``); each call gets its own handle or its own
  ``PublishError``. A lone call waits for no timer: it is published on the
  loop's next iteration.

The publish path of ``App.send()``, ``App.asend()`` and ``App.send_many()``
lives here too (:func:`send`, :func:`asend`, :func:`send_many`): the app's
methods call these functions.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog

from .exceptions import BulkPublishError, PublishError, TransportError
from .message import Message
from .ordering.publish import is_ordered, route
from .task import Confirmation, TaskHandle

if TYPE_CHECKING:
    from .app import App
    from .transport import Envelope, Transport

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_IN_FLIGHT",
    "Item",
    "LoopBatcher",
    "Publishing",
    "asend",
    "bulk_error",
    "check_priority",
    "current_block",
    "loop_batcher",
    "prepare",
    "publish_encoded",
    "send",
    "send_many",
    "settle",
]

# The name App's publishing always logged under.
logger = structlog.get_logger("mqtasks.app")

#: Messages a block gathers at most before it hands them over, when the
#: transport declares no ``confirm_window`` of its own.
DEFAULT_WINDOW = 500

#: Batches handed over and unconfirmed at most; then ``delay()`` waits for the oldest.
MAX_IN_FLIGHT = 2

#: The publishing blocks open in this context, innermost last.
_open_blocks: contextvars.ContextVar[tuple[Publishing, ...]] = contextvars.ContextVar(
    "mqtasks_publishing", default=()
)

#: Transport classes whose ``publish_many`` takes ``delays=``, by class.
_bulk_delays: dict[type[Any], bool] = {}

#: What a message becomes in a batch: ``(message, (queue, envelope), delay)``.
Item = tuple[Message, tuple[str, "Envelope"], "float | None"]


def current_block(app: App) -> Publishing | None:
    """Return the innermost block of ``app`` open in this thread, or None."""
    blocks = _open_blocks.get()
    if not blocks:
        return None
    ident = threading.get_ident()
    for block in reversed(blocks):
        if block.app is app and block._thread == ident:
            return block
    return None


def _takes_delays(transport: Transport) -> bool:
    cls = type(transport)
    known = _bulk_delays.get(cls)
    if known is None:
        # No capability says it (and the transport layer is not ours to change
        # here); the bulk path's own signature does.
        known = _bulk_delays[cls] = "delays" in inspect.signature(cls.publish_many).parameters
    return known


def publish_encoded(app: App, items: Sequence[Item]) -> list[BaseException | None]:
    """Declare the queues of ``items`` and publish them with confirms pipelined.

    Runs in any thread and calls no middleware (see :func:`settle`). Delayed
    items go through ``publish_many`` when it takes ``delays=``, else one by one.

    Returns:
        Per item, None if the broker confirmed it, else why it was not enqueued.
    """
    transport = app.transport
    results: list[BaseException | None] = [None] * len(items)
    try:
        transport.declare([app.queue(q) for q in dict.fromkeys(i[1][0] for i in items)])
    except TransportError as exc:
        for n, (message, _, _) in enumerate(items):
            results[n] = PublishError(
                f"Task {message.id} was NOT enqueued on {message.queue!r}: {exc}",
                task_id=message.id,
            )
        return results
    bulk_delays = _takes_delays(transport)
    bulk = [n for n, item in enumerate(items) if bulk_delays or not item[2]]
    if bulk:
        pairs = [items[n][1] for n in bulk]
        delays = [items[n][2] for n in bulk]
        if any(delays):
            # Only transports whose publish_many takes delays= get here.
            answers = transport.publish_many(pairs, delays=delays)  # type: ignore[call-arg]
        else:
            answers = transport.publish_many(pairs)
        for n, answer in zip(bulk, answers, strict=True):
            results[n] = answer
    for n, (_, (queue, envelope), delay) in enumerate(items):
        if delay and not bulk_delays:
            try:
                transport.publish(queue, envelope, delay=delay)
            except Exception as exc:  # this message's answer; the others' stand
                results[n] = exc
    return results


def _not_confirmed(items: Sequence[Item], exc: BaseException) -> list[BaseException | None]:
    """Return, per item, the error of a batch whose publishing raised ``exc``."""
    return [
        PublishError(
            f"Task {m.id} was NOT confirmed ({type(exc).__name__}: {exc}); it may or may not "
            "be enqueued. Publishing it again with the same task id makes a duplicate "
            "detectable.",
            task_id=m.id,
        )
        for m, _, _ in items
    ]


def settle(
    app: App, messages: Sequence[Message], results: Sequence[BaseException | None]
) -> dict[str, BaseException]:
    """Run the publish middleware for a published batch; return the failures by id.

    ``after_publish`` runs for the confirmed messages, ``after_publish_error``
    for each of the others, in the thread that ran ``before_publish``.
    """
    hooks = app._hooks
    hooks.after_publish(app, [m for m, r in zip(messages, results, strict=True) if r is None])
    failures: dict[str, BaseException] = {}
    for message, error in zip(messages, results, strict=True):
        if error is not None:
            hooks.after_publish_error(app, [message], error)
            failures[message.id] = error
    return failures


def bulk_error(failures: dict[str, BaseException], total: int, sent: list[Any]) -> BulkPublishError:
    """Return the error naming every message of ``total`` that was not enqueued."""
    first = next(iter(failures.values()))
    return BulkPublishError(
        f"{len(failures)} of {total} tasks were NOT enqueued (ids: "
        f"{', '.join(list(failures)[:20])}{', ...' if len(failures) > 20 else ''}; "
        f"first error: {first}). Publish them again with the same task ids, or "
        "look at .failed for each error.",
        sent=sent,
        failed=failures,
    )


class Publishing:
    """A block in which ``delay()`` does not wait for each confirm; its exit waits for all.

    Created by :meth:`App.publishing() <mqtasks.app.App.publishing>`; use it
    once, as a context manager, in the thread that created it::

        with app.publishing() as batch:
            for order in orders:
                charge.delay(order.id)  # a pending handle, at once
        # every message is confirmed here, or BulkPublishError was raised

    Args:
        app: The app whose tasks the block publishes.
        window: Most messages gathered before they are handed to the broker;
            the transport's ``confirm_window`` or :data:`DEFAULT_WINDOW` when None.

    Raises:
        ValueError: ``window`` is below 1.
    """

    def __init__(self, app: App, window: int | None = None) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be at least 1, not {window!r}")
        self.app = app
        #: Most messages gathered before they are handed to the broker.
        self.window: int = (
            window
            if window is not None
            else int(getattr(app.transport, "confirm_window", DEFAULT_WINDOW))
        )
        #: Handles of the messages sent through the block, in order.
        self.handles: list[TaskHandle] = []
        #: Task id -> why it was not enqueued, for each message the broker refused
        #: (filled as the block goes; complete after exit).
        self.failed: dict[str, BaseException] = {}
        self._gathered: list[tuple[Item, Confirmation]] = []
        self._in_flight: deque[tuple[list[tuple[Item, Confirmation]], Future[Any]]] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._thread: int | None = None
        self._token: contextvars.Token[tuple[Publishing, ...]] | None = None
        self._used = False

    def __repr__(self) -> str:
        return f"<Publishing app={self.app.name!r} window={self.window} sent={len(self.handles)}>"

    def __enter__(self) -> Publishing:
        if self._used:
            raise RuntimeError("a Publishing block is used once; call app.publishing() again")
        self._used = True
        self._thread = threading.get_ident()
        self._token = _open_blocks.set((*_open_blocks.get(), self))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _open_blocks.reset(self._token)
            self._token = None
        # Contexts copied inside the block (asyncio tasks created in it) still list
        # it: from now on their delay() publishes and waits as outside any block.
        self._thread = None
        try:
            if self._gathered:
                self._hand_over()
            while self._in_flight:
                self._settle_oldest()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        if self.failed:
            sent = [h for h in self.handles if h.confirmed]
            raise bulk_error(self.failed, len(self.handles), sent)

    def add(self, message: Message, envelope: Envelope, delay: float | None) -> TaskHandle:
        """Take an encoded message to publish; return its pending handle.

        Called by :meth:`App.send <mqtasks.app.App.send>` after the checks.
        """
        confirmation = Confirmation()
        handle = TaskHandle(message.id, message.task, message.queue, confirmation, app=self.app)
        self.handles.append(handle)
        self._gathered.append(((message, (message.queue, envelope), delay), confirmation))
        in_flight = self._in_flight
        while in_flight and in_flight[0][1].done():
            self._settle_oldest()
        # Nothing in flight: the broker is idle, so what is gathered leaves now;
        # otherwise it gathers until the batch in flight is done or a window is full.
        if not in_flight or len(self._gathered) >= self.window:
            self._hand_over()
        return handle

    def _hand_over(self) -> None:
        """Give the gathered messages to the block's publishing thread."""
        batch, self._gathered = self._gathered, []
        while len(self._in_flight) >= MAX_IN_FLIGHT:
            self._settle_oldest()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="mqtasks-publishing")
        future = self._executor.submit(publish_encoded, self.app, [item for item, _ in batch])
        self._in_flight.append((batch, future))

    def _settle_oldest(self) -> None:
        """Wait for the oldest batch in flight; settle its handles and run the hooks."""
        batch, future = self._in_flight.popleft()
        items = [item for item, _ in batch]
        try:
            results = future.result()
        except Exception as exc:
            results = _not_confirmed(items, exc)
        self.failed.update(settle(self.app, [item[0] for item in items], results))
        for (_, confirmation), error in zip(batch, results, strict=True):
            confirmation.settle(error)


class LoopBatcher:
    """Collects the ``adelay()`` calls of one event loop iteration into one bulk publish.

    It holds no reference to its loop (the app keeps one batcher per loop,
    weakly keyed by the loop) and runs only in the loop's thread.

    Args:
        app: The app whose messages it publishes.
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self._waiting: list[tuple[Item, asyncio.Future[TaskHandle]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, message: Message, envelope: Envelope, delay: float | None) -> TaskHandle:
        """Publish an encoded message with the others of this loop iteration; return its handle.

        Raises:
            PublishError: The message was not enqueued.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[TaskHandle] = loop.create_future()
        if not self._waiting:
            # Runs after the callbacks already ready, so calls made together
            # (asyncio.gather) join; a lone call still leaves on the next iteration.
            loop.call_soon(self._flush)
        self._waiting.append(((message, (message.queue, envelope), delay), future))
        return await future

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._publish(batch))
        self._tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, batch: list[tuple[Item, asyncio.Future[TaskHandle]]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = await asyncio.to_thread(publish_encoded, self.app, items)
        except BaseException as exc:  # cancelled with its loop, or the thread raised
            results = _not_confirmed(items, exc)
            self._resolve(batch, results)
            if not isinstance(exc, Exception):
                raise
            return
        self._resolve(batch, results)

    def _resolve(
        self,
        batch: list[tuple[Item, asyncio.Future[TaskHandle]]],
        results: Sequence[BaseException | None],
    ) -> None:
        settle(self.app, [item[0] for item, _ in batch], results)
        for ((message, _, _), future), error in zip(batch, results, strict=True):
            if future.done():  # the caller was cancelled; the message went all the same
                continue
            if error is None:
                future.set_result(TaskHandle(message.id, message.task, message.queue, app=self.app))
            else:
                future.set_exception(error)


def loop_batcher(app: App) -> LoopBatcher:
    """Return the batcher of ``app`` for the running event loop.

    Raises:
        RuntimeError: No event loop is running in this thread.
    """
    loop = asyncio.get_running_loop()
    batchers = app._batchers
    batcher = batchers.get(loop)
    if batcher is None:
        # Only the loop's own thread gets here for this loop, so no lock is needed.
        batcher = batchers[loop] = LoopBatcher(app)
    return batcher


# -- App's publishing (App.send, App.asend, App.send_many delegate here) -------------


def send(
    app: App, message: Message, *, names: list[str] | None = None, delay: float | None = None
) -> TaskHandle:
    """Encode and publish ``message`` for ``app``, running the publish middleware;
    see :meth:`App.send <mqtasks.app.App.send>`.

    Raises:
        EncodeError: Arguments JSON cannot carry, or a body over ``max_message_size``.
        PublishError: The broker did not take the message.
        ConfigurationError: A delay or priority given to an ordered task.
    """
    message, envelope = prepare(app, route(app, message, delay), names)
    block = current_block(app)
    # A delay the broker cannot hold raises at the call, below, as outside a block.
    if block is not None and (not delay or app.transport.capabilities.delays):
        return block.add(message, envelope, delay)
    hooks = app._hooks
    try:
        transport = app.transport
        try:
            transport.declare([app.queue(message.queue)])
        except TransportError as exc:
            raise PublishError(
                f"Task {message.id} was NOT enqueued on {message.queue!r}: {exc}",
                task_id=message.id,
            ) from exc
        if delay:
            transport.publish(message.queue, envelope, delay=delay)
        else:
            transport.publish(message.queue, envelope)
    except BaseException as exc:
        hooks.after_publish_error(app, [message], exc)
        raise
    hooks.after_publish(app, [message])
    return TaskHandle(message.id, message.task, message.queue, app=app)


async def asend(
    app: App, message: Message, *, names: list[str] | None = None, delay: float | None = None
) -> TaskHandle:
    """:func:`send` for asyncio code; see :meth:`App.asend <mqtasks.app.App.asend>`.

    Raises:
        EncodeError: Arguments JSON cannot carry, or a body over ``max_message_size``.
        PublishError: The broker did not take the message.
    """
    # The key's sequence number comes from the backend: in a thread, as unique keys are.
    if is_ordered(app, message):
        message = await asyncio.to_thread(route, app, message, delay)
    message, envelope = prepare(app, message, names)
    return await loop_batcher(app).send(message, envelope, delay)


def prepare(app: App, message: Message, names: list[str] | None) -> tuple[Message, Envelope]:
    """Run ``before_publish`` and encode; on an error, run ``after_publish_error`` and raise."""
    hooks = app._hooks
    message = hooks.before_publish(app, message)
    try:
        envelope = message.encode(max_size=app.settings.max_message_size, names=names)
        if message.priority is not None and message.queue not in app._priority_checked:
            check_priority(app, message.queue)
    except BaseException as exc:
        hooks.after_publish_error(app, [message], exc)
        raise
    return message, envelope


def check_priority(app: App, queue: str) -> None:
    """Say once per queue when the broker would ignore the priorities sent to it."""
    app._priority_checked.add(queue)
    reason = app.transport.priority_ignored(app.queue(queue))
    if reason is not None:
        logger.warning("publish.priority_ignored", queue=queue, reason=reason)


def send_many(app: App, messages: Iterable[Message]) -> list[TaskHandle]:
    """Publish many messages at once, with the broker's confirms pipelined;
    see :meth:`App.send_many <mqtasks.app.App.send_many>`.

    Raises:
        EncodeError: A message cannot be encoded; nothing was published.
        BulkPublishError: Some messages were not enqueued; ``.sent`` and
            ``.failed`` say which.
    """
    hooks = app._hooks
    prepared: list[Message] = []
    messages = [route(app, message) for message in messages]
    try:
        for message in messages:
            prepared.append(hooks.before_publish(app, message))
        limit = app.settings.max_message_size
        items: list[Item] = []
        for message in prepared:
            task = app.tasks.get(message.task)
            names = task._names if task is not None else None
            envelope = message.encode(max_size=limit, names=names)
            items.append((message, (message.queue, envelope), None))
        if not items:
            return []
        for queue in {m.queue for m in prepared if m.priority is not None}:
            if queue not in app._priority_checked:
                check_priority(app, queue)
        results = publish_encoded(app, items)
    except BaseException as exc:
        hooks.after_publish_error(app, prepared, exc)
        raise
    failures = settle(app, prepared, results)
    sent = [
        TaskHandle(m.id, m.task, m.queue, app=app)
        for m, r in zip(prepared, results, strict=True)
        if r is None
    ]
    if failures:
        raise bulk_error(failures, len(prepared), sent) from next(iter(failures.values()))
    return sent
