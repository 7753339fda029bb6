"""Signature: a call of a task, to send later, alone or as a step of a workflow."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ..middleware.workflow_schema import signature_error
from ..task import TaskHandle, _delay
from ..types import Seconds, to_seconds
from ._sending import _PARENT, _backend_of, _new_id

if TYPE_CHECKING:
    from ..app import App
    from ..message import Message
    from ..task import Task
    from .workflows import Chain, ChainGroup, Group

__all__ = ["Signature"]

R = TypeVar("R")
T = TypeVar("T")


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
        from .workflows import Chain, ChainGroup, Group  # they are built from signatures

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
