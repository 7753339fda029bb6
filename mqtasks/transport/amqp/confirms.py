"""Publisher confirms on RabbitMQ: which published message the broker has acked or nacked.

A channel in confirm mode numbers its messages from 1 in publishing order, and
the broker settles them with ``basic.ack`` or ``basic.nack``, one delivery tag
or (``multiple``) every tag up to one. :class:`Confirms` is the one record of
that, used by every confirmed publish: a pooled channel's single ``publish()``,
a bulk ``publish_many()`` and ``_ConfirmPipeline``, the confirming channel
that every thread's ``delay()`` shares.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import kombu

from ..._url import mask_url
from ...exceptions import PublishError
from ..envelope import Envelope
from ..kombu import deadline_errback
from .wire import _PublishFrames, read_available

if TYPE_CHECKING:
    from . import AmqpTransport

__all__ = ["Confirm", "Confirms", "read_confirms"]

#: How the broker settled a message.
Outcome = Literal["ack", "nack"]


class Confirm:
    """One message published on a confirming channel, until the broker settles it."""

    __slots__ = ("outcome",)

    def __init__(self) -> None:
        #: "ack" or "nack" once the broker settled it.
        self.outcome: Outcome | None = None


C = TypeVar("C", bound=Confirm)


class Confirms(Generic[C]):
    """The delivery tags of one confirming channel and the messages not settled yet.

    Args:
        lock: Held while the record changes, when more than one thread uses it
            (the broker's answers are read by any of them). Without it, one
            thread at a time.
        on_settle: Called with each message as the broker settles it (after its
            :attr:`~Confirm.outcome` is set; ``lock`` is held).
    """

    __slots__ = ("_lock", "_on_settle", "pending", "published")

    def __init__(
        self,
        *,
        lock: contextlib.AbstractContextManager[Any] | None = None,
        on_settle: Callable[[C], object] | None = None,
    ) -> None:
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._on_settle = on_settle
        #: Delivery tag of the last message published on the channel.
        self.published = 0
        #: Messages the broker has not settled yet, by delivery tag, lowest first.
        self.pending: dict[int, C] = {}

    def select(self, channel: Any) -> None:
        """Put py-amqp's ``channel`` in confirm mode, its acks and nacks recorded here."""
        channel.events["basic_ack"].add(self.on_ack)
        channel.events["basic_nack"].add(self.on_nack)
        channel._confirm_selected = True  # py-amqp's flag: never selected twice
        channel.confirm_select()

    def add(self, confirm: C) -> int:
        """Record ``confirm`` as the next message published on the channel; return its tag."""
        with self._lock:
            tag = self.published = self.published + 1
            self.pending[tag] = confirm
        return tag

    def on_ack(self, tag: int, multiple: bool) -> None:
        """Record a ``basic.ack`` (py-amqp's handler signature)."""
        self._settle(tag, multiple, "ack")

    def on_nack(self, tag: int, multiple: bool) -> None:
        """Record a ``basic.nack`` (py-amqp's handler signature)."""
        self._settle(tag, multiple, "nack")

    def _settle(self, tag: int, multiple: bool, outcome: Outcome) -> None:
        with self._lock:
            pending = self.pending
            if multiple:  # every tag up to this one (pending is in publishing order)
                tags = list(itertools.takewhile(lambda t: t <= tag, pending))
            else:
                tags = [tag] if tag in pending else []
            on_settle = self._on_settle
            for t in tags:
                confirm = pending.pop(t)
                confirm.outcome = outcome
                if on_settle is not None:
                    on_settle(confirm)


def read_confirms(connection: Any, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for the broker's answers on ``connection`` and dispatch them.

    Acks and nacks reach the :class:`Confirms` of their channel, returns its
    return handlers. Returns when something was read or the time is up; the
    caller checks whether what it waits for came.

    Args:
        connection: A py-amqp connection, used by this thread only meanwhile.
        timeout: Most seconds to wait.
    """
    sock = connection.transport.sock
    if hasattr(sock, "pending"):  # TLS: decrypted bytes select() cannot see
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=timeout)
    elif select.select([sock], [], [], timeout)[0]:
        read_available(connection, sock)


class _BrokerNacked(Exception):
    """The broker nacked the message just published (a full queue with
    ``overflow=reject-publish``, for one): the publish is over, not retried.

    :meth:`Transport.publish` turns it into :class:`~mqtasks.exceptions.PublishNacked`
    (its cause is py-amqp's ``MessageNacked``).
    """


class _Waiter(Confirm):
    """One message published on the shared confirming channel, until the broker settles it."""

    __slots__ = ("connection", "error", "message_id", "returned", "signalled", "wake")

    def __init__(self, message_id: str, connection: Any) -> None:
        super().__init__()
        self.message_id = message_id
        #: The py-amqp connection it was written on (its acks come only on that one).
        self.connection = connection
        #: ``(exception, routing_key)`` when the broker returned it (no queue bound).
        self.returned: tuple[Any, str] | None = None
        #: Why its connection was given up before it was settled.
        self.error: BaseException | None = None
        #: Held while nothing is to be told to its thread; released to wake it
        #: (``signalled`` says a release is pending; both under the pipeline's lock).
        self.wake = threading.Lock()
        self.wake.acquire()
        self.signalled = False

    @property
    def done(self) -> bool:
        return self.outcome is not None or self.error is not None


class _Unsettled(Exception):
    """The shared connection was lost or broken before the broker settled a message."""


class _ConnectFailed(Exception):
    """No connection could be opened within the publish's retries and time (see ``__cause__``)."""


#: Every live pipeline, so that a forked child starts each without its parent's connection.
_PIPELINES: weakref.WeakSet[_ConfirmPipeline] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pipeline in list(_PIPELINES):
        pipeline._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _ConfirmPipeline:
    """One connection and confirming channel that every thread's ``publish()`` shares.

    Written by hand because neither kombu nor py-amqp pipelines confirms across
    threads: py-amqp's confirmed publish waits on its channel for one confirm at a
    time, so each thread needs a pooled connection, and the broker then handles a
    channel, a confirm and a TCP round trip per message. Here threads write their
    frames to one channel, each taking the next delivery tag under a lock, and one
    of the waiting threads reads the socket for all while the others sleep: one
    read settles every ack that arrived (``multiple`` acks included) and wakes
    exactly the threads whose messages they settle; a reader whose own message is
    settled hands the reading to another waiting thread. A ``basic.return``
    (which the broker sends before the ack of the same message) marks the oldest
    unsettled message with that id.

    A write or read that fails, or a confirm that does not come in time, gives up
    the whole connection: every message on it that is not settled yet is published
    again by its own caller on a new one, as a pooled connection's publish is
    retried (at least once: the broker may have had it).
    """

    def __init__(self, transport: AmqpTransport) -> None:
        self.transport = transport
        self._reset()
        _PIPELINES.add(self)

    def _reset(self) -> None:
        """Start with no connection (also in a forked child: the parent's socket is not its own)."""
        #: Guards the connection and writes (re-entrant: a failed write gives up
        #: the connection while holding it).
        self._write = threading.RLock()
        #: Guards the waiters, their outcomes and wake-ups, and the reader's role.
        self._state = threading.Lock()
        self._kombu: kombu.Connection | None = None
        self._amqp: Any = None  # the py-amqp connection of the current channel
        self._sock: Any = None
        self._frames: _PublishFrames | None = None
        #: The current channel's messages (its delivery tags start again at 1).
        self._confirms: Confirms[_Waiter] | None = None
        self._reading = False

    # -- the connection ------------------------------------------------------

    def _open(self, deadline: float) -> None:
        """Connect (once per call) and open a confirming channel; the write lock is held."""
        transport = self.transport
        conn = self._kombu
        if conn is None:
            conn = self._kombu = transport.connection()
        # kombu's reconnect loop, as its ensure() runs it for a pooled publish: up to
        # publish_retries attempts, moving along a failover list, each within what is
        # left of the publish's time (a frozen broker accepts TCP, then says nothing).
        conn.ensure_connection(
            errback=deadline_errback(conn, deadline, transport.connect_timeout),
            max_retries=transport.publish_retries,
            interval_start=0.1,
            interval_step=0.5,
            interval_max=2.0,
        )
        try:
            channel = conn.channel()
            confirms: Confirms[_Waiter] = Confirms(lock=self._state, on_settle=self._signal)
            channel.events["basic_return"].add(partial(self._on_return, confirms))
            confirms.select(channel)
            sock = channel.connection.transport.sock
            sock.settimeout(transport.publish_timeout)  # bounds a write the broker does not read
        except BaseException:
            # A channel that is not in confirm mode must not stay open beside the
            # next attempt's: the connection is dropped with it (no polite close,
            # which would wait on a broker that may not answer), and the retry
            # connects anew.
            self._kombu = None
            with contextlib.suppress(Exception):
                conn.collect()
            raise
        self._amqp = channel.connection
        self._sock = sock
        self._frames = _PublishFrames(channel)
        self._confirms = confirms

    def _give_up(self, connection: Any, exc: BaseException) -> None:
        """Drop ``connection`` (if still current) and fail its unsettled messages."""
        confirms = None
        with self._write:
            if connection is not None and connection is self._amqp:
                confirms = self._confirms
                self._amqp = self._sock = self._frames = self._confirms = None
                if self._kombu is not None:
                    with contextlib.suppress(Exception):
                        self._kombu.collect()  # no polite close: the broker may not answer
                    if getattr(self.transport, "failover", False):
                        # A new connection starts at the next node of the list: kombu's
                        # own reconnect would try this node first again, and a frozen
                        # node accepts TCP and then says nothing until the timeout.
                        self._kombu = None
        if confirms is None:
            return  # not current: given up before, with every message written on it
        with self._state:
            waiters = list(confirms.pending.values())
            confirms.pending.clear()
            for waiter in waiters:
                waiter.error = exc
                self._signal(waiter)

    def renew(self, waiter: _Waiter) -> None:
        """Give up the connection ``waiter``'s message was nacked on (if still current);
        its other unsettled messages are published again by their callers."""
        self._give_up(waiter.connection, _Unsettled("a nack asked for a new channel"))

    def close(self) -> None:
        """Close the connection; publishes still waiting fail and retry on a new one."""
        with self._write:
            connection, conn = self._amqp, self._kombu
            self._kombu = None
        self._give_up(connection, _Unsettled("the transport was closed"))
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect()

    # -- broker answers (run by the reading thread, the state lock held) -----

    @staticmethod
    def _signal(waiter: _Waiter) -> None:
        if not waiter.signalled:
            waiter.signalled = True
            waiter.wake.release()

    def _on_return(
        self, confirms: Confirms[_Waiter], exc: Any, exchange: str, routing_key: str, message: Any
    ) -> None:
        message_id = message.properties.get("message_id")
        with self._state:
            for waiter in confirms.pending.values():
                if waiter.message_id == message_id and waiter.returned is None:
                    waiter.returned = (exc, routing_key)
                    break

    # -- publishing ----------------------------------------------------------

    def send(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope,
        properties: bytes,
        deadline: float,
        mandatory: bool = True,
    ) -> _Waiter:
        """Write one message with the next delivery tag; return its waiter.

        Raises:
            PublishError: The write lock was not free before ``deadline`` (a broker
                that stopped reading holds a writer for up to ``publish_timeout``).
        """
        if not self._write.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise PublishError(
                f"Task {envelope.message_id} was NOT enqueued: the publishing connection "
                f"stayed busy until the timeout (broker {mask_url(self.transport.url)}).",
                task_id=envelope.message_id,
            )
        try:
            if self._frames is None:
                try:
                    self._open(deadline)
                except Exception as exc:
                    raise _ConnectFailed(str(exc)) from exc
            frames, confirms = self._frames, self._confirms
            assert frames is not None and confirms is not None
            waiter = _Waiter(envelope.message_id, self._amqp)
            confirms.add(waiter)
            try:
                frames.add(exchange, routing_key, properties, envelope.body, mandatory)
                frames.flush()
            except BaseException as exc:
                self._give_up(waiter.connection, exc)
                raise
            return waiter
        finally:
            self._write.release()

    def wait(self, waiter: _Waiter, envelope: Envelope, deadline: float) -> None:
        """Return once the broker settled ``waiter``'s message or its connection was given up.

        Raises:
            PublishError: No confirm came before ``deadline`` (the connection is given
                up: a broker that does not answer one message answers none).
        """
        state = self._state
        woken = False
        while True:
            with state:
                if woken:
                    waiter.signalled = False  # that release is consumed
                if waiter.done:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                reader = not self._reading
                self._reading = True
            if not reader:
                woken = waiter.wake.acquire(timeout=remaining)
                continue
            woken = False
            failed: BaseException | None = None
            try:
                self._read(waiter, remaining)
            except Exception as exc:
                failed = exc
            with state:
                self._reading = False
                confirms = self._confirms
                if confirms is not None and (waiter.done or failed is not None):
                    # Someone else's message still waits for its confirm: its
                    # thread reads next.
                    for other in confirms.pending.values():
                        if other is not waiter:
                            self._signal(other)
                            break
            if failed is not None:
                self._give_up(waiter.connection, failed)
        self._give_up(waiter.connection, _Unsettled("no confirm within the publish timeout"))
        raise PublishError(
            f"Task {envelope.message_id} was NOT confirmed in time; it may or may not "
            f"be enqueued (broker {mask_url(self.transport.url)}). Publishing it again with the "
            "same task id makes a duplicate detectable.",
            task_id=envelope.message_id,
        )

    def _read(self, waiter: _Waiter, timeout: float) -> None:
        """Read what the socket of ``waiter``'s connection holds and dispatch it."""
        connection = waiter.connection
        sock = self._sock
        if connection is not self._amqp or sock is None:
            raise _Unsettled("the connection was given up")
        # A second at a time: a connection given up by another thread (a failed
        # write) closes the socket under this select(), which may not wake it.
        if select.select([sock], [], [], min(timeout, 1.0))[0]:
            read_available(connection, sock)
