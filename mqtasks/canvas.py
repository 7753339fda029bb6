"""Canvas: signatures, and the workflows built from them: chain, group and chord.

A :class:`Signature` is a task call to send later (``add.s(1, 2)``). A
:func:`chain` runs signatures one after another, each getting the previous
step's value as its first argument; a :func:`group` runs them side by side; a
:func:`chord` runs a group, then a callback with the list of their values.

Nothing polls: every step's id is chosen when the workflow is sent, what comes
next travels in each message (the body's ``workflow`` member), and the
worker's :class:`~mqtasks.middleware.workflow.Workflow` middleware publishes
it when a step ends, from the outcome the result backend stored. Workflows
therefore need a result backend (``App(..., backend=...)``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from .exceptions import ConfigurationError, ResultTimeout
from .middleware.workflow import chord_ids_key, signature_error
from .result import (
    FAILURE_STATES,
    PENDING,
    SUCCEEDED,
    Outcome,
    decode_outcome,
    fetch_outcome,
    wait_outcome,
)
from .task import TaskHandle, _delay
from .types import Seconds, to_seconds

if TYPE_CHECKING:
    from .app import App
    from .backend.base import Backend
    from .message import Message
    from .task import Task

__all__ = [
    "Chain",
    "ChainGroup",
    "ChainHandle",
    "Chord",
    "Group",
    "GroupHandle",
    "Signature",
    "chain",
    "chord",
    "group",
]

R = TypeVar("R")
T = TypeVar("T")
R1 = TypeVar("R1")
R2 = TypeVar("R2")
R3 = TypeVar("R3")
R4 = TypeVar("R4")
R5 = TypeVar("R5")
R6 = TypeVar("R6")


class _Parent:
    """Stands for a value a step will get from the workflow, when its arguments are checked."""

    def __repr__(self) -> str:
        return "<previous result>"


_PARENT = _Parent()


def _new_id() -> str:
    return str(uuid.uuid4())


class Signature(Generic[R]):
    """A call of a task, to send later: alone, or as a step of a workflow.

    Made by :meth:`Task.s() <mqtasks.task.Task.s>` and :meth:`Task.si()
    <mqtasks.task.Task.si>`; immutable (every method returns a new one).

    Args:
        task: The task to call.
        args: Positional arguments. In a chain, the previous step's value is
            put before them, unless the signature is ``immutable``.
        kwargs: Keyword arguments.
        immutable: Ignore the previous step's value (``si()``).
        options: ``queue``, ``priority``, ``countdown`` (see :meth:`set`).
        id: The task id to send it with; a new UUID when sent, if None.
        on_error: Signatures run as ``sig(task_id, error)`` if this call fails for good.
    """

    __slots__ = ("_on_error", "args", "id", "immutable", "kwargs", "options", "task")

    def __init__(
        self,
        task: Task[..., R],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
        options: Mapping[str, Any] | None = None,
        id: str | None = None,
        on_error: Sequence[Signature[Any]] = (),
    ) -> None:
        #: The task to call.
        self.task: Task[..., R] = task
        #: Positional arguments.
        self.args: tuple[Any, ...] = tuple(args)
        #: Keyword arguments.
        self.kwargs: dict[str, Any] = dict(kwargs or {})
        #: Whether the previous step's value is ignored.
        self.immutable = immutable
        #: Sending options: ``queue``, ``priority``, ``countdown``.
        self.options: dict[str, Any] = dict(options or {})
        #: The task id it is sent with (None: a new one each time it is sent).
        self.id = id
        self._on_error: tuple[Signature[Any], ...] = tuple(on_error)

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        method = "si" if self.immutable else "s"
        return f"{self.task.name}.{method}({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Signature):
            return NotImplemented
        return self.to_dict() == other.to_dict() and self.task.app is other.task.app

    __hash__ = None  # type: ignore[assignment]  # mutable contents (args may be lists)

    @property
    def name(self) -> str:
        """The task's registered name."""
        return self.task.name

    @property
    def errbacks(self) -> tuple[Signature[Any], ...]:
        """The signatures run if this call fails for good (:meth:`on_error`)."""
        return self._on_error

    def _replace(self, **changes: Any) -> Signature[R]:
        values: dict[str, Any] = {
            "args": self.args,
            "kwargs": self.kwargs,
            "immutable": self.immutable,
            "options": self.options,
            "id": self.id,
            "on_error": self._on_error,
        }
        values.update(changes)
        return Signature(self.task, **values)

    def set(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        countdown: Seconds | None = None,
        task_id: str | None = None,
    ) -> Signature[R]:
        """Return a copy with sending options set (those given; the others kept).

        Args:
            queue: Queue to publish to instead of the task's.
            priority: Message priority (0-255).
            countdown: Seconds the broker holds the message before a worker gets
                it (in a chain: counted from when the previous step ended).
            task_id: The id to send it with (a chain's or chord's steps get
                new ids otherwise).

        Raises:
            ValueError: ``priority`` is not 0 to 255.
        """
        options = dict(self.options)
        if queue is not None:
            options["queue"] = queue
        if priority is not None:
            if not 0 <= priority <= 255:
                raise ValueError(f"priority must be 0 to 255, not {priority!r}")
            options["priority"] = priority
        if countdown is not None:
            options["countdown"] = to_seconds(countdown)
        return self._replace(options=options, id=task_id if task_id is not None else self.id)

    def on_error(self, errback: Signature[Any]) -> Signature[R]:
        """Return a copy that runs ``errback`` if this call fails for good.

        The errback is sent as ``errback(task_id, error)``, its own arguments
        after these two, where ``error`` is ``{"type": ..., "message": ...,
        "reason": ...}`` and ``task_id`` is the id of the call that failed.
        "For good" means the call's outcome is final: it was dead-lettered
        (retries exhausted, rejected...), not retried. Celery calls this
        ``link_error``.
        """
        if not isinstance(errback, Signature):
            raise TypeError(f"on_error() takes a signature (task.s(...)), not {errback!r}")
        return self._replace(on_error=(*self._on_error, errback))

    @overload
    def __or__(self, other: Signature[T]) -> Chain[T]: ...
    @overload
    def __or__(self, other: Group[T]) -> ChainGroup[T]: ...
    def __or__(self, other: Signature[Any] | Group[Any]) -> Chain[Any] | ChainGroup[Any]:
        """``a.s() | b.s()`` is ``chain(a.s(), b.s())``; ``a.s() | group(...)`` too."""
        if isinstance(other, Group):
            return ChainGroup((self,), other)
        return Chain((self, other))

    # -- the JSON form ------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return the signature as JSON-able values (the form messages carry).

        ``{"task", "args", "kwargs", "options", "immutable", "id", "on_error"}``;
        :meth:`from_dict` reads it back.
        """
        return {
            "task": self.task.name,
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "options": dict(self.options),
            "immutable": self.immutable,
            "id": self.id,
            "on_error": [e.to_dict() for e in self._on_error],
        }

    @classmethod
    def from_dict(cls, app: App, data: Mapping[str, Any]) -> Signature[Any]:
        """Build a signature from :meth:`to_dict`'s form, its task looked up in ``app``.

        Raises:
            ValueError: ``data`` is not a signature's JSON form.
            TaskNotRegistered: ``app`` has no task of that name.
        """
        problem = signature_error(data)
        if problem is not None:
            raise ValueError(f"not a signature: {problem}")
        return cls(
            app.get_task(data["task"]),
            data.get("args") or (),
            data.get("kwargs") or {},
            immutable=bool(data.get("immutable")),
            options=data.get("options") or {},
            id=data.get("id"),
            on_error=[cls.from_dict(app, e) for e in data.get("on_error") or ()],
        )

    def _wire(self, task_id: str | None) -> dict[str, Any]:
        """The form a message carries for a later step: id, queue and priority resolved.

        The worker publishing the step then needs neither the task registered
        nor its defaults. Errbacks get no id: the worker derives theirs from
        the failed task's, so that a failure handled twice sends the same one.
        """
        data = self.to_dict()
        data["id"] = task_id
        options = data["options"]
        options.setdefault("queue", self.task.queue)
        if options.get("priority") is None and self.task.priority is not None:
            options["priority"] = self.task.priority
        if self.task.expires is not None:
            options.setdefault("expires", self.task.expires)
        data["on_error"] = [e._wire(None) for e in self._on_error]
        return data

    # -- checks and messages --------------------------------------------------------

    def _check(self, args: Sequence[Any], kwargs: Mapping[str, Any], what: str) -> None:
        """Check a call of this signature; raise a TypeError naming it as ``what``."""
        try:
            self.task.check_arguments(args, kwargs)
        except TypeError as exc:
            raise TypeError(
                f"{what} {self!r} does not fit {self.task.name}{self.task.signature}: {exc}"
            ) from None
        for errback in self._on_error:
            errback._check(
                (_PARENT, _PARENT, *errback.args), errback.kwargs, f"The on_error of {what}"
            )

    def _message(
        self,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        workflow: dict[str, Any],
        what: str,
    ) -> Message:
        """The message of this signature's first (or only) call."""
        self._check(args, kwargs, what)
        if self._on_error:
            workflow["on_error"] = [e._wire(None) for e in self._on_error]
        message = self.task.message(
            tuple(args),
            kwargs,
            queue=self.options.get("queue"),
            priority=self.options.get("priority"),
            task_id=task_id,
        )
        return message.copy(workflow=workflow or None)

    # -- sending --------------------------------------------------------------------

    def delay(self, *args: Any, **kwargs: Any) -> TaskHandle:
        """Send the call alone; ``args`` go before the signature's own, ``kwargs`` over them.

        Raises:
            TypeError: The arguments do not fit the task's function.
            EncodeError: An argument cannot be sent as JSON, or the message is too large.
            PublishError: The message was not enqueued.
        """
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        task_id: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        countdown: Seconds | None = None,
        eta: datetime | None = None,
        expires: Seconds | datetime | None = None,
    ) -> TaskHandle:
        """Send the call alone, with options over the signature's; see
        :meth:`Task.apply_async <mqtasks.task.Task.apply_async>`.

        Raises:
            TypeError: The arguments do not fit the task's function.
            EncodeError: An argument cannot be sent as JSON, or the message is too large.
            PublishError: The message was not enqueued.
            ConfigurationError: The signature has an errback and the app no result
                backend (only a worker with one runs errbacks).
        """
        call_args = (*(args or ()), *self.args)
        call_kwargs = {**self.kwargs, **(kwargs or {})}
        self._check(call_args, call_kwargs, "The signature")
        if self._on_error:
            _backend_of(self.task.app, "on_error")
        task_id = task_id or self.id or _new_id()
        message = self.task.message(
            call_args,
            call_kwargs,
            queue=queue or self.options.get("queue"),
            priority=priority if priority is not None else self.options.get("priority"),
            task_id=task_id,
            expires=expires,
        )
        if self._on_error:
            message = message.copy(workflow={"on_error": [e._wire(None) for e in self._on_error]})
        if countdown is None and eta is None:
            countdown = self.options.get("countdown")
        return self.task.app.send(message, names=self.task._names, delay=_delay(countdown, eta))


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


def _signature(item: Any, what: str) -> Signature[Any]:
    if isinstance(item, Signature):
        return item
    if isinstance(item, (Chain, ChainGroup, Group, Chord)):
        kind = "chain ending in a group" if isinstance(item, ChainGroup) else type(item).__name__
        raise TypeError(
            f"A {kind.lower()} cannot be {what}. Supported: chains of "
            "signatures (the last step may be a group of signatures), groups and chord "
            "headers of signatures or chains, and a signature as a chord's callback."
        )
    raise TypeError(f"{what[0].upper()}{what[1:]} must be a signature (task.s(...)), not {item!r}")


class Chain(Generic[R]):
    """Signatures run one after another; each step gets the previous step's value first.

    Made by :func:`chain` (or ``a.s() | b.s()``). Its value is the last step's.
    """

    __slots__ = ("steps",)

    def __init__(self, steps: Iterable[Signature[Any]]) -> None:
        #: The steps, in order.
        self.steps: tuple[Signature[Any], ...] = tuple(
            _signature(s, "a step of a chain") for s in steps
        )
        if not self.steps:
            raise ValueError("A chain needs at least one step.")
        _one_app(self.steps, "chain")

    def __repr__(self) -> str:
        return " | ".join(repr(s) for s in self.steps)

    @overload
    def __or__(self, other: Signature[T]) -> Chain[T]: ...
    @overload
    def __or__(self, other: Group[T]) -> ChainGroup[T]: ...
    def __or__(self, other: Signature[Any] | Group[Any]) -> Chain[Any] | ChainGroup[Any]:
        """``chain(...) | c.s()`` appends a step; ``chain(...) | group(...)`` ends it in a group."""
        if isinstance(other, Group):
            return ChainGroup(self.steps, other)
        return Chain((*self.steps, other))

    @property
    def app(self) -> App:
        """The app the steps' tasks belong to."""
        return self.steps[0].task.app

    def on_error(self, errback: Signature[Any]) -> Chain[R]:
        """Return a copy whose steps all run ``errback`` if they fail for good.

        A failed step ends the chain, so ``errback`` runs once, for that step.
        """
        return Chain(s.on_error(errback) for s in self.steps)

    def _first(
        self,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[Message, float | None, list[str]]:
        """The first step's message (carrying the rest), its countdown, and every step's id.

        ``extra`` goes into every step's workflow (a chord membership, the group
        a chain ends in).
        """
        steps = self.steps
        ids = [s.id or _new_id() for s in steps]
        for i, step in enumerate(steps[1:], start=2):
            step_args = step.args if step.immutable else (_PARENT, *step.args)
            step._check(step_args, step.kwargs, f"Step {i} of the chain,")
        workflow: dict[str, Any] = dict(extra or {})
        if len(steps) > 1:
            workflow["chain"] = [s._wire(i) for s, i in zip(steps[1:], ids[1:], strict=True)]
        first = steps[0]
        message = first._message(
            ids[0],
            (*args, *first.args),
            {**first.kwargs, **kwargs},
            workflow,
            "Step 1 of the chain,",
        )
        return message, to_seconds(first.options.get("countdown")), ids

    def delay(self, *args: Any, **kwargs: Any) -> ChainHandle:
        """Send the chain; ``args`` and ``kwargs`` go to the first step.

        Returns:
            The last step's handle: its ``get()`` is the chain's value, or
            raises :exc:`~mqtasks.exceptions.TaskFailed` naming the step that failed.

        Raises:
            TypeError: A step's arguments do not fit its task (named in the
                message); the previous step's value counts as one argument.
            ConfigurationError: The app has no result backend.
            EncodeError: An argument cannot be sent as JSON, or the message is too large.
            PublishError: The first step was not enqueued.
        """
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None
    ) -> ChainHandle:
        """Send the chain, ``args`` and ``kwargs`` going to the first step; see :meth:`delay`."""
        app = self.app
        _backend_of(app, "A chain")
        message, countdown, ids = self._first(args or (), kwargs or {})
        first = self.steps[0]
        sent = app.send(message, names=first.task._names, delay=countdown)
        # Inside a publishing block the first step's confirm is pending: so is the chain's.
        return ChainHandle(
            ids[-1],
            self.steps[-1].name,
            confirmation=sent.confirmation,
            app=app,
            steps=(sent, *(app.handle(i) for i in ids[1:])),
        )


def _handle(app: App, task_id: str) -> TaskHandle:
    return app.handle(task_id)


@dataclass(frozen=True)
class ChainHandle(TaskHandle):
    """What a chain's ``delay()`` returns: the last step's handle, which reaches the others.

    Its :meth:`~mqtasks.task.TaskHandle.get` is the chain's value; a failed
    step makes it raise :exc:`~mqtasks.exceptions.TaskFailed` naming that step.
    """

    #: Every step's handle, in order (the last is this one's task).
    steps: tuple[TaskHandle, ...] = field(default=(), repr=False, compare=False)

    @property
    def parent(self) -> TaskHandle | None:
        """The handle of the step before the last one (None for a one-step chain)."""
        return self.steps[-2] if len(self.steps) > 1 else None


@overload
def chain(s1: Signature[R1], /) -> Chain[R1]: ...
@overload
def chain(s1: Signature[Any], s2: Signature[R2], /) -> Chain[R2]: ...
@overload
def chain(s1: Signature[Any], s2: Signature[Any], s3: Signature[R3], /) -> Chain[R3]: ...
@overload
def chain(
    s1: Signature[Any], s2: Signature[Any], s3: Signature[Any], s4: Signature[R4], /
) -> Chain[R4]: ...
@overload
def chain(
    s1: Signature[Any],
    s2: Signature[Any],
    s3: Signature[Any],
    s4: Signature[Any],
    s5: Signature[R5],
    /,
) -> Chain[R5]: ...
@overload
def chain(
    s1: Signature[Any],
    s2: Signature[Any],
    s3: Signature[Any],
    s4: Signature[Any],
    s5: Signature[Any],
    s6: Signature[R6],
    /,
) -> Chain[R6]: ...
@overload
def chain(s1: Signature[Any], g: Group[R2], /) -> ChainGroup[R2]: ...
@overload
def chain(s1: Signature[Any], s2: Signature[Any], g: Group[R3], /) -> ChainGroup[R3]: ...
@overload
def chain(
    s1: Signature[Any], s2: Signature[Any], s3: Signature[Any], g: Group[R4], /
) -> ChainGroup[R4]: ...
@overload
def chain(*steps: Signature[Any]) -> Chain[Any]: ...
def chain(*steps: Signature[Any] | Group[Any]) -> Chain[Any] | ChainGroup[Any]:
    """Return a chain: the steps run one after another, each getting the previous value first.

    ::

        chain(add.s(1, 2), add.s(3), add.s(4)).delay().get()  # ((1 + 2) + 3) + 4 == 10

    The last step may be a group of signatures: each member then gets the
    previous value (a :class:`ChainGroup`, whose value is the members' list)::

        chain(add.s(1, 2), group([add.s(10), add.s(20)])).delay().get()  # [13, 23]

    Raises:
        ValueError: No step.
        TypeError: A step is not a signature (a group is accepted as the last
            step only; chords are not supported inside chains).
        ConfigurationError: The steps' tasks belong to two apps.
    """
    if steps and isinstance(steps[-1], Group):
        return ChainGroup(steps[:-1], steps[-1])  # type: ignore[arg-type]  # checked there
    return Chain(steps)  # type: ignore[arg-type]  # checked there


class ChainGroup(Generic[R]):
    """A chain whose last step is a group: every member gets the last signature's value.

    Made by :func:`chain` (or ``a.s() | group(...)``). Its value is the list of
    the members' values, in order; a member whose signature is immutable
    (``si()``) does not get the value.
    """

    __slots__ = ("group", "head")

    def __init__(self, head: Iterable[Signature[Any]], group: Group[R]) -> None:
        #: The steps before the group.
        self.head: Chain[Any] = Chain(head)
        if not isinstance(group, Group) or not len(group):
            raise TypeError("A chain can end in a group of at least one member.")
        for m in group.members:
            if not isinstance(m, Signature):
                raise TypeError(
                    "A group that ends a chain must hold signatures; a chain as its member "
                    "is not supported."
                )
        #: The group the chain ends in.
        self.group: Group[R] = group
        _one_app([*self.head.steps, *group._signatures()], "chain")

    def __repr__(self) -> str:
        return f"{self.head!r} | {self.group!r}"

    def on_error(self, errback: Signature[Any]) -> ChainGroup[R]:
        """Return a copy whose steps and members all run ``errback`` if they fail for good."""
        members = [m.on_error(errback) for m in self.group._signatures()]
        return ChainGroup(self.head.on_error(errback).steps, Group(members))

    def delay(self, *args: Any, **kwargs: Any) -> GroupHandle[R]:
        """Send the chain; ``args`` and ``kwargs`` go to the first step.

        Returns:
            The group's handle (its :attr:`~GroupHandle.parent` is the last
            signature step's): ``get()`` returns the members' values.

        Raises:
            TypeError: A step's or member's arguments do not fit its task (named
                in the message); the previous value counts as one argument.
            ConfigurationError: The app has no result backend.
            EncodeError: An argument cannot be sent as JSON, or the message is too large.
            PublishError: The first step was not enqueued.
        """
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None
    ) -> GroupHandle[R]:
        """Send the chain, ``args`` and ``kwargs`` going to the first step; see :meth:`delay`."""
        head = self.head
        app = head.app
        _backend_of(app, "A chain")
        members: list[Signature[Any]] = self.group._signatures()
        ids = [m.id or _new_id() for m in members]
        for i, member in enumerate(members, start=1):
            member_args = member.args if member.immutable else (_PARENT, *member.args)
            member._check(member_args, member.kwargs, f"Member {i} of the group ending the chain,")
        tail = {"group": [m._wire(i) for m, i in zip(members, ids, strict=True)]}
        message, countdown, step_ids = head._first(args or (), kwargs or {}, tail)
        sent = app.send(message, names=head.steps[0].task._names, delay=countdown)
        parent: TaskHandle = sent if len(step_ids) == 1 else app.handle(step_ids[-1])
        return GroupHandle(app, ids, parent=parent)


class Group(Generic[R]):
    """Signatures (or chains) run side by side; the value is the list of theirs, in order.

    Made by :func:`group`.
    """

    __slots__ = ("members",)

    def __init__(self, members: Iterable[Signature[R] | Chain[R]]) -> None:
        if isinstance(members, (Signature, Chain)):
            raise TypeError(
                "group() takes an iterable of signatures: group([a.s(), b.s()]), "
                "not group(a.s(), ...)."
            )
        items: list[Signature[R] | Chain[R]] = []
        for m in members:
            items.append(m if isinstance(m, Chain) else _signature(m, "a member of a group"))
        #: The members, in order.
        self.members: tuple[Signature[R] | Chain[R], ...] = tuple(items)
        if self.members:
            _one_app(self._signatures(), "group")

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(m) for m in self.members)}])"

    def __len__(self) -> int:
        return len(self.members)

    def _signatures(self) -> list[Signature[Any]]:
        return [s for m in self.members for s in (m.steps if isinstance(m, Chain) else (m,))]

    def _messages(
        self, extra: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[list[tuple[Message, float | None]], list[str]]:
        """Each member's first message and countdown, and each member's result id.

        ``extra[i]`` is added to member ``i``'s workflow when given.
        """
        out: list[tuple[Message, float | None]] = []
        ids: list[str] = []
        for i, member in enumerate(self.members):
            wf = dict(extra[i]) if extra else {}
            if isinstance(member, Chain):
                message, countdown, chain_ids = member._first((), {}, wf)
                ids.append(chain_ids[-1])
            else:
                task_id = member.id or _new_id()
                message = member._message(
                    task_id,
                    member.args,
                    member.kwargs,
                    wf,
                    f"Member {i + 1} of the group,",
                )
                countdown = to_seconds(member.options.get("countdown"))
                ids.append(task_id)
            out.append((message, countdown))
        return out, ids

    def delay(self) -> GroupHandle[R]:
        """Send every member, in one pipelined publish; return the group's handle.

        Raises:
            TypeError: A member's arguments do not fit its task (named in the message).
            ConfigurationError: The app has no result backend.
            EncodeError: A member cannot be sent (nothing was sent).
            BulkPublishError: Some members were not enqueued.
        """
        return self.apply_async()

    def apply_async(self) -> GroupHandle[R]:
        """Send every member; see :meth:`delay`.

        Raises:
            ValueError: The group has no member.
        """
        if not self.members:
            raise ValueError("The group has no member.")
        app = _one_app(self._signatures(), "group")
        _backend_of(app, "A group")
        messages, ids = self._messages()
        _send_all(app, messages)
        return GroupHandle(app, ids)


def _send_all(app: App, messages: list[tuple[Message, float | None]]) -> None:
    """Publish ``messages``: pipelined in one ``send_many``, those with a countdown one by one."""
    now = [m for m, countdown in messages if not countdown]
    if now:
        app.send_many(now)
    for message, countdown in messages:
        if countdown:
            task = app.tasks.get(message.task)
            app.send(message, names=task._names if task else None, delay=countdown)


def group(members: Iterable[Signature[R] | Chain[R]]) -> Group[R]:
    """Return a group: the members run side by side; its value is the list of theirs.

    ::

        group(add.s(i, i) for i in range(10)).delay().get()  # [0, 2, 4, ..., 18]

    Raises:
        TypeError: A member is neither a signature nor a chain.
        ConfigurationError: The members' tasks belong to two apps.
    """
    return Group(members)


class GroupHandle(Generic[R]):
    """What a group's ``delay()`` returns: the members' ids, and their values once stored.

    Args:
        app: The app whose result backend holds the members' outcomes.
        ids: The members' task ids (a chain member's: its last step's), in order.
    """

    __slots__ = ("app", "ids", "parent")

    def __init__(self, app: App, ids: Sequence[str], *, parent: TaskHandle | None = None) -> None:
        self.app = app
        #: The members' task ids, in order.
        self.ids: tuple[str, ...] = tuple(ids)
        #: For a group that ends a chain, the handle of the step before it.
        self.parent = parent

    def __repr__(self) -> str:
        return f"<GroupHandle of {len(self.ids)}>"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def handles(self) -> list[TaskHandle]:
        """A handle per member, in order."""
        return [_handle(self.app, i) for i in self.ids]

    def _outcomes(self) -> list[Outcome | None]:
        backend = self.app.backend
        return [
            None if stored is None else decode_outcome(stored[0])
            for stored in backend.get_results(self.ids)
        ]

    @property
    def states(self) -> list[str]:
        """Each member's state (``PENDING`` when nothing is stored), in order."""
        return [PENDING if o is None else o.state for o in self._outcomes()]

    def ready(self) -> bool:
        """Whether every member has a final outcome."""
        return all(o is not None and o.final for o in self._outcomes())

    def successful(self) -> bool:
        """Whether every member succeeded."""
        return all(o is not None and o.state == SUCCEEDED for o in self._outcomes())

    def failed(self) -> bool:
        """Whether some member ended without a value."""
        return any(o is not None and o.state in FAILURE_STATES for o in self._outcomes())

    def get(self, timeout: float | None = None, *, propagate: bool = True) -> list[R]:
        """Wait for every member; return their values, in order.

        Args:
            timeout: Seconds to wait for all of them; None waits as long as it takes.
            propagate: Raise for a failed member; if False, its place holds the
                :exc:`~mqtasks.exceptions.TaskFailed` instead of a value.

        Raises:
            TaskFailed: A member failed (the first in order), when ``propagate``.
            ResultTimeout: Not every member ended within ``timeout`` seconds.
            BackendError: The backend cannot be reached.
        """
        backend = self.app.backend
        deadline = None if timeout is None else time.monotonic() + timeout
        values: list[Any] = []
        for task_id in self.ids:
            outcome = fetch_outcome(backend, task_id)
            if outcome is None or not outcome.final:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    outcome = wait_outcome(backend, task_id, left)
                except ResultTimeout as exc:
                    done = len(values)
                    raise ResultTimeout(
                        f"The group has no final result after {timeout:g} s: {done} of "
                        f"{len(self.ids)} members ended before member {task_id}. {exc}",
                        task_id=task_id,
                        timeout=exc.timeout,
                    ) from None
            error = outcome.error(task_id)
            if error is not None:
                if propagate:
                    raise error
                values.append(error)
            else:
                values.append(outcome.value)
        return values

    async def aget(self, timeout: float | None = None, *, propagate: bool = True) -> list[R]:
        """:meth:`get` for asyncio code, waiting in a thread so the event loop keeps running."""
        return await asyncio.to_thread(self.get, timeout, propagate=propagate)


class Chord(Generic[R]):
    """A group whose values, once all stored, go to a callback as one list.

    Made by :func:`chord`. Its value is the callback's.
    """

    __slots__ = ("callback", "header")

    def __init__(
        self, header: Group[Any] | Iterable[Signature[Any] | Chain[Any]], callback: Signature[R]
    ) -> None:
        #: The members run first.
        self.header: Group[Any] = header if isinstance(header, Group) else Group(header)
        #: Run once every member succeeded, with their values.
        self.callback: Signature[R] = _signature(callback, "a chord's callback")
        _one_app([*self.header._signatures(), self.callback], "chord")

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.callback!r})"

    def on_error(self, errback: Signature[Any]) -> Chord[R]:
        """Return a copy that runs ``errback`` if a member or the callback fails for good.

        A failed member fails the chord: ``errback(member_id, error)`` runs once
        and the callback never runs.
        """
        return Chord(self.header, self.callback.on_error(errback))

    def delay(self) -> TaskHandle:
        """Send the header's members; the callback follows once all of them succeeded.

        Returns:
            The callback's handle: its ``get()`` is the chord's value, or raises
            :exc:`~mqtasks.exceptions.TaskFailed` naming the member that failed.

        Raises:
            TypeError: A member's or the callback's arguments do not fit its task
                (the list of values counts as the callback's first argument).
            ConfigurationError: The app has no result backend.
            BackendError: The member ids could not be stored.
            EncodeError: A member cannot be sent (nothing was sent).
            BulkPublishError: Some members were not enqueued.
        """
        return self.apply_async()

    def apply_async(self) -> TaskHandle:
        """Send the chord; see :meth:`delay`."""
        callback = self.callback
        app = callback.task.app
        backend = _backend_of(app, "A chord")
        cb_args = callback.args if callback.immutable else (_PARENT, *callback.args)
        callback._check(cb_args, callback.kwargs, "The chord's callback")
        cid = callback.id or _new_id()
        size = len(self.header)
        if size == 0:
            args = callback.args if callback.immutable else ([], *callback.args)
            message = callback._message(
                cid, args, callback.kwargs, {"dedupe": True}, "The chord's callback"
            )
            app.send(message, names=callback.task._names)
            return _handle(app, cid)
        wire = callback._wire(cid)
        extra = [
            {"chord": {"id": cid, "size": size, "index": i, "callback": wire}} for i in range(size)
        ]
        messages, ids = self.header._messages(extra)
        # Stored before any member is sent: the member completing the chord reads them.
        backend.put(chord_ids_key(cid), json.dumps(ids).encode(), app.settings.result_expires)
        _send_all(app, messages)
        return _handle(app, cid)


def chord(
    header: Group[Any] | Iterable[Signature[Any] | Chain[Any]], callback: Signature[R]
) -> Chord[R]:
    """Return a chord: the header's members run side by side, then ``callback(values)``.

    ::

        chord((add.s(i, i) for i in range(100)), tsum.s()).delay().get()  # 9900

    The callback runs exactly once, after every member succeeded; a member
    that fails for good fails the chord instead (the callback never runs).

    Raises:
        TypeError: A member or the callback is not a signature (chains are
            accepted as members).
        ConfigurationError: The tasks belong to two apps.
    """
    return Chord(header, callback)
