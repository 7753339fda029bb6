"""Pins the public types; checked by mypy (tox -e type), never run."""

from __future__ import annotations

from typing_extensions import assert_type

from mqtasks import App, Task, TaskHandle
from mqtasks.publishing import Publishing

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
