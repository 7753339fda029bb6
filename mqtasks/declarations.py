"""The App's declarations with modules of their own: event subscriptions and emits
(:mod:`mqtasks.events`) and periodic schedules (:mod:`mqtasks.periodic`).

:class:`~mqtasks.app.App` inherits them; they live here to keep ``app.py`` small.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from . import events as _events
from .events import EventHandle
from .exceptions import ConfigurationError
from .periodic import Schedule, make_schedule
from .task import P, R, Task
from .types import Seconds

if TYPE_CHECKING:
    from .app import App
    from .canvas.signature import Signature

__all__ = ["EventsAPI", "PeriodicAPI"]


class EventsAPI:
    """:meth:`on`, :meth:`emit` and :meth:`aemit` of :class:`~mqtasks.app.App`."""

    def on(
        self,
        pattern: str,
        *,
        queue: str | None = None,
        name: str | None = None,
        priority: int | None = None,
        expires: Seconds | None = None,
        **task_options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as the subscriber of events matching ``pattern``.

        ::

            @app.on("order.*")
            def audit(payload: dict) -> None: ...

            app.emit("order.created", {"id": 42})  # audit runs once, on a worker

        The subscriber is a task with a queue of its own, bound to the events
        exchange with ``pattern``: every subscriber whose pattern matches gets
        each event once; workers sharing its queue share its events. Retries,
        dead letters and middleware apply as to any task. It takes one
        argument, the event payload, and stores no result (``ignore_result``).

        Args:
            pattern: AMQP topic pattern: words separated by ``.``, ``*`` exactly
                one word, ``#`` zero or more words (``order.*``, ``order.#``).
            queue: Its queue; ``"<app name>.<function name>"`` by default.
            name: Task name; ``module.qualname`` of the function by default.
            priority: Default message priority of its retries.
            expires: Seconds after emitting past which an event is not run.
            task_options: Task options (``max_retries``, ``retry_backoff``,
                middleware options), as for :meth:`task`.

        Raises:
            ConfigurationError: A bad pattern, a function that cannot take one
                argument, a queue with another subscriber already (both named),
                ``ignore_result=False``, ``idempotent`` or ``unique_for`` (keyed by
                the id every subscriber shares), or an option no middleware understands.
            DuplicateTask: Another function is registered under the same task name.
        """
        return _events.subscribe(
            cast("App", self),
            pattern,
            queue=queue,
            name=name,
            priority=priority,
            expires=expires,
            task_options=task_options,
        )

    def emit(
        self,
        event: str,
        payload: Any = None,
        *,
        mandatory: bool = True,
        headers: Mapping[str, Any] | None = None,
        event_id: str | None = None,
    ) -> EventHandle:
        """Publish an event: every subscriber whose pattern matches ``event`` runs it once.

        Returns once the broker has confirmed it, as ``delay()`` does; the
        publish middleware runs (traces, metrics, logs). Inside a
        :meth:`publishing` block it is published at once all the same. The
        bindings of this app's own subscribers are declared first (once), so
        an event sent before their workers start waits in their queues.

        Args:
            event: The event name, the routing key: words separated by ``.``
                (``order.created``).
            payload: The subscribers' argument (a JSON value).
            mandatory: Raise :class:`~mqtasks.exceptions.Unroutable` when no
                subscriber queue is bound for ``event``; False drops it quietly.
            headers: Extra headers, passed through to the subscribers.
            event_id: The message id; a new UUID by default.

        Returns:
            The event's handle: its id, and how many queues got it where the broker says.

        Raises:
            ValueError: A bad event name, or a reserved (``mqtasks-``) header.
            EncodeError: A payload JSON cannot carry, or over ``max_message_size``.
            Unroutable: ``mandatory`` and no queue is bound for ``event``.
            PublishError: The broker did not take the event.
            ConfigurationError: The transport cannot route events (``redis+kombu://``).
        """
        return _events.emit(
            cast("App", self),
            event,
            payload,
            mandatory=mandatory,
            headers=headers,
            event_id=event_id,
        )

    async def aemit(
        self,
        event: str,
        payload: Any = None,
        *,
        mandatory: bool = True,
        headers: Mapping[str, Any] | None = None,
        event_id: str | None = None,
        stream: str | None = None,
    ) -> EventHandle:
        """:meth:`emit` for asyncio code: the publish and its confirm run in a thread,
        the event loop keeps running. ``stream`` appends to a stream, as
        :meth:`mqtasks.app.App.emit` does.

        Raises:
            ValueError: A bad event name, or a reserved (``mqtasks-``) header.
            EncodeError: A payload JSON cannot carry, or over ``max_message_size``.
            Unroutable: ``mandatory`` and no queue is bound for ``event``.
            PublishError: The broker did not take the event.
            ConfigurationError: The transport cannot route events.
        """
        emit: Callable[..., EventHandle] = self.emit  # App.emit also takes stream=
        extra = {"stream": stream} if stream is not None else {}
        return await asyncio.to_thread(
            emit, event, payload, mandatory=mandatory, headers=headers, event_id=event_id, **extra
        )


class PeriodicAPI:
    """:meth:`periodic` and :meth:`add_periodic` of :class:`~mqtasks.app.App`."""

    def periodic(
        self,
        *,
        cron: str | None = None,
        every: Seconds | None = None,
        tz: str | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        catch_up: str = "latest",
        **task_options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task and send it on a schedule (``mqtasks beat``).

        ::

            @app.periodic(cron="*/5 * * * *", tz="Europe/Berlin")
            def cleanup() -> None: ...

        Args:
            cron: A standard 5-field cron expression, evaluated in ``tz``.
            every: Seconds (or a timedelta) between ticks, aligned to the epoch.
            tz: The cron expression's time zone (UTC by default).
            args: Positional arguments of each call.
            kwargs: Keyword arguments of each call.
            name: The schedule's name (in tick ids and ``--list``); the task's name by default.
            catch_up: Ticks missed while no scheduler ran: ``"all"``, ``"latest"`` or ``"none"``.
            task_options: Options of the task, as for :meth:`task` (``task_name``: its name).

        Raises:
            ConfigurationError: A bad schedule (named in the message), or a bad task option.
        """
        task_name = task_options.pop("task_name", None)

        def register(func: Callable[P, R]) -> Task[P, R]:
            app = cast("App", self)
            task: Task[P, R] = app.task(name=task_name, **task_options)(func)
            try:
                self._schedule(task, name, cron, every, tz, args, kwargs, {}, catch_up)
            except ConfigurationError:
                del app.tasks[task.name]
                raise
            return task

        return register

    def add_periodic(
        self,
        signature: Signature[Any],
        *,
        cron: str | None = None,
        every: Seconds | None = None,
        tz: str | None = None,
        name: str | None = None,
        catch_up: str = "latest",
    ) -> Schedule:
        """Send a call of a task defined elsewhere on a schedule.

        ::

            app.add_periodic(report.s("daily"), cron="0 6 * * *", name="daily-report")

        The signature's arguments and options (``queue``, ``priority``,
        ``expires``) are those of each call. Arguments as for :meth:`periodic`.

        Raises:
            ConfigurationError: A bad schedule (named in the message), or a task of another app.
        """
        if signature.task.app is not self:
            raise ConfigurationError(
                f"Periodic schedule {name or signature.task.name!r}: task "
                f"{signature.task.name!r} belongs to another app; schedule it on that app."
            )
        return self._schedule(
            signature.task,
            name,
            cron,
            every,
            tz,
            signature.args,
            signature.kwargs,
            signature.options,
            catch_up,
        )

    def _schedule(
        self,
        task: Task[Any, Any],
        name: str | None,
        cron: str | None,
        every: Seconds | None,
        tz: str | None,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        catch_up: str,
    ) -> Schedule:
        schedule = make_schedule(
            name or task.name,
            task,
            cron=cron,
            every=every,
            tz=tz,
            args=tuple(args),
            kwargs=kwargs,
            options=options,
            catch_up=catch_up,
        )
        cast("App", self).schedules.add(schedule)
        return schedule
