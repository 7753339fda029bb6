"""Registering a function as a task: a :class:`~mqtasks.task.Task`, or a
:class:`BatchTask` when it sets ``batch_size``.

A batch task's function takes a list of items; each message carries one item,
so :meth:`BatchTask.delay` takes one item's type::

    @app.task(batch_size=100, batch_wait=1.0)
    def index(docs: list[dict]) -> None: ...

    index.delay({"id": 1})     # one item per message
    index([{"id": 1}])         # a plain call runs the function on a list

How a worker collects and runs the batches is ``mqtasks.execution.batch``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Concatenate, Protocol, TypeVar, overload

from .events import same_function
from .exceptions import ConfigurationError, DuplicateTask
from .task import P, R, Task, TaskHandle

if TYPE_CHECKING:
    from .app import App
    from .canvas import Signature
    from .types import Seconds

__all__ = ["BatchDecorator", "BatchTask", "define"]

ItemT = TypeVar("ItemT")
R_co = TypeVar("R_co", covariant=True)


class BatchTask(Task[[list[ItemT]], R]):
    """A task that consumes its messages in batches (``batch_size``): each message
    carries one item (of type ``ItemT``); the function gets a list of them.

    Created by :meth:`App.task(batch_size=...) <mqtasks.app.App.task>`, not directly.
    """

    def delay(self, item: ItemT) -> TaskHandle:  # type: ignore[override]
        """Send one item to the batches of a worker; return once the broker has confirmed it.

        Raises:
            EncodeError: The item cannot be sent as JSON, or the message is too large.
            PublishError: The message was not enqueued.
        """
        return self.apply_async((item,))

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """Refused: a workflow step is one call with one result, and a batch gives neither.

        Raises:
            ConfigurationError: Always; says what to do instead.
        """
        raise ConfigurationError(
            f"Task {self.name!r} consumes its messages in batches (batch_size): it cannot "
            "be a step of a chain, group or chord, whose steps each run alone and store "
            "their own result. Send its items with delay(item), or use a task without "
            "batch_size in the workflow."
        )

    si = s

    async def adelay(self, item: ItemT) -> TaskHandle:  # type: ignore[override]
        """:meth:`delay` from asyncio code.

        Raises:
            EncodeError: The item cannot be sent as JSON, or the message is too large.
            PublishError: The message was not enqueued.
        """
        return await self.aapply_async((item,))


class BatchDecorator(Protocol):
    """What ``@app.task(batch_size=...)`` returns: makes a function on a list of
    items a :class:`BatchTask` whose messages carry one item each."""

    @overload
    def __call__(self, fn: Callable[[list[ItemT]], R_co], /) -> BatchTask[ItemT, R_co]: ...

    # A function of more required arguments is refused when it is defined
    # (ConfigurationError); typed as such, it is no batch task.
    @overload
    def __call__(self, fn: Callable[Concatenate[Any, Any, ...], R_co], /) -> Task[..., R_co]: ...


def define(
    app: App,
    fn: Callable[P, R],
    name: str | None,
    queue: str | None,
    priority: int | None,
    expires: Seconds | None,
    options: Mapping[str, Any],
) -> Task[P, R]:
    """Register ``fn`` in ``app`` as a task (a :class:`BatchTask` with ``batch_size``).

    Raises:
        ConfigurationError: A bad option (see :class:`~mqtasks.task.Task`).
        DuplicateTask: Another function is registered under the same name.
    """
    task_name = name or app._default_name(fn)
    existing = app.tasks.get(task_name)
    if existing is not None and existing.fn is not fn:
        if same_function(existing.fn, fn):
            return existing  # type: ignore[return-value]  # module imported twice
        raise DuplicateTask(
            f"Task name {task_name!r} is already registered to {existing.fn!r}; "
            "pass name=... to one of them."
        )
    kind: type[Task[Any, Any]] = BatchTask if options.get("batch_size") is not None else Task
    task: Task[P, R] = kind(
        fn,
        app,
        name=task_name,
        queue=queue or app.settings.default_queue,
        priority=priority,
        expires=expires,
        options=options,
    )
    app.tasks[task_name] = task
    return task
