"""Workflows: the shapes built from signatures (chain, group, chord) and how each is sent.

A :class:`Chain` runs signatures one after another, a :class:`Group` side by
side, a :class:`Chord` a group then a callback; a :class:`ChainGroup` is a
chain that ends in a group. They refer to each other (a group's member may be
a chain, a chain may end in a group), hence one module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ..middleware.workflow_keys import chord_ids_key
from ..types import to_seconds
from ._sending import _PARENT, _backend_of, _new_id, _one_app, _send_all
from .handles import ChainHandle, GroupHandle, _handle
from .signature import R, Signature, T

if TYPE_CHECKING:
    from ..app import App
    from ..message import Message
    from ..task import TaskHandle

__all__ = ["Chain", "ChainGroup", "Chord", "Group", "chain", "chord", "group"]

R1 = TypeVar("R1")
R2 = TypeVar("R2")
R3 = TypeVar("R3")
R4 = TypeVar("R4")
R5 = TypeVar("R5")
R6 = TypeVar("R6")


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


def group(members: Iterable[Signature[R] | Chain[R]]) -> Group[R]:
    """Return a group: the members run side by side; its value is the list of theirs.

    ::

        group(add.s(i, i) for i in range(10)).delay().get()  # [0, 2, 4, ..., 18]

    Raises:
        TypeError: A member is neither a signature nor a chain.
        ConfigurationError: The members' tasks belong to two apps.
    """
    return Group(members)


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
