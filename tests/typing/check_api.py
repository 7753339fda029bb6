"""Pins the public types; checked by mypy (tox -e type), never run."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from typing_extensions import assert_type

from mqtasks import App, EventHandle, Results, ResultTimeout, Task, TaskFailed, TaskHandle
from mqtasks.backend import Backend
from mqtasks.middleware import Idempotency, Middleware, with_idempotency
from mqtasks.middleware.results import current_outcome
from mqtasks.publishing import Publishing
from mqtasks.result import Outcome

app = App("typing")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(queue="emails", priority=5)
def send(user_id: int) -> None: ...


assert isinstance(add, Task)
assert_type(add(1, 2), int)
assert_type(add.delay(1, 2), TaskHandle)
assert_type(send.delay(3), TaskHandle)
add.delay("x", 2)  # type: ignore[arg-type]  # the ParamSpec catches a wrong argument type
send.delay()  # type: ignore[call-arg]  # and a missing one

with app.publishing() as batch:
    assert_type(batch, Publishing)
    assert_type(add.delay(1, 2), TaskHandle)
assert_type(app.publishing(window=100), Publishing)
assert_type(batch.handles, list[TaskHandle])
assert_type(add.delay(1, 2).confirmed, bool)
assert_type(add.delay(1, 2).pending, bool)
assert_type(add.delay(1, 2).error, BaseException | None)


async def send_from_asyncio() -> None:
    assert_type(await add.adelay(1, 2), TaskHandle)
    assert_type(await add.aapply_async((1, 2), countdown=5), TaskHandle)
    await add.adelay("x", 2)  # type: ignore[arg-type]  # checked as delay() is


@app.task(time_limit=30, soft_time_limit=timedelta(seconds=25))
async def fetch(url: str) -> int:
    return len(url)


# A coroutine task keeps its parameters: delay() is synchronous, adelay() awaited.
assert_type(fetch.delay("u"), TaskHandle)
fetch.delay(1)  # type: ignore[arg-type]


async def fetch_from_asyncio() -> None:
    assert_type(await fetch.adelay("u"), TaskHandle)
    assert_type(fetch.delay("u").revoke(), str)


# Results: the handle reads what the worker stored in the app's backend.
results_app = App("typing", backend="redis://localhost:6379/0", result_expires=3600.0)
handle = add.delay(1, 2)
assert_type(handle.get(), Any)
assert_type(handle.get(timeout=5, propagate=False), Any)
assert_type(handle.get(timedelta(seconds=5)), Any)
assert_type(handle.state, str)
assert_type(handle.ready(), bool)
assert_type(handle.successful(), bool)
assert_type(handle.failed(), bool)
assert_type(handle.result, Any)
assert_type(handle.outcome(), Outcome | None)
assert_type(handle.forget(), None)
assert_type(handle.task, str | None)
assert_type(handle.queue, str | None)
assert_type(results_app.handle("an-id"), TaskHandle)
assert_type(results_app.backend, Backend)
assert_type(results_app.has_backend, bool)
assert_type(current_outcome(), Outcome | None)
assert_type(Results(defer_delay=0.5), Results)
handle.get(propagate="no")  # type: ignore[arg-type]  # a bool


async def wait_from_asyncio() -> None:
    assert_type(await handle.aget(timeout=5), Any)


def read_failure(exc: TaskFailed, timeout: ResultTimeout) -> None:
    assert_type(exc.reason, str | None)
    assert_type(exc.exc_type, str | None)
    assert_type(exc.traceback, str | None)
    assert_type(timeout.timeout, float)


# Unique tasks and idempotent consumers.
@results_app.task(unique_for=timedelta(hours=1), idempotent=True)
def rebuild(day: str) -> None: ...


assert_type(rebuild.unique_for, float | None)
assert_type(add.apply_async((1, 2), idempotency_key="charge-42"), TaskHandle)
assert_type(add.apply_async((1, 2), idempotency_key="charge-42").duplicate, bool)
add.apply_async((1, 2), idempotency_key=42)  # type: ignore[arg-type]  # a string
assert_type(Idempotency(defer_delay=0.5), Idempotency)
assert_type(with_idempotency([Idempotency()]), list[Middleware])


async def send_unique_from_asyncio() -> None:
    assert_type(await add.aapply_async((1, 2), idempotency_key="k"), TaskHandle)


# Events: subscribers are tasks of one argument, emit returns an EventHandle.
@app.on("order.*")
def audit(event: dict[str, Any]) -> None: ...


assert_type(audit.delay({"id": 7}), TaskHandle)
audit.delay({"id": 7}, 8)  # type: ignore[call-arg]  # a subscriber takes one payload
assert_type(app.emit("order.created", {"id": 7}), EventHandle)
assert_type(app.emit("order.created", {"id": 7}, mandatory=False).routed, int | None)
app.emit(7, {"id": 7})  # type: ignore[arg-type]  # an event name is a string


async def emit_from_asyncio() -> None:
    assert_type(await app.aemit("order.created", {"id": 7}), EventHandle)
