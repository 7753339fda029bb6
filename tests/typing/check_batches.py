"""Pins the types of batch tasks; checked by mypy, never run."""

from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

from mqtasks import App, Task, TaskHandle
from mqtasks.batch_task import BatchTask

app = App("typing-batches")


@app.task(batch_size=100, batch_wait=1.0)
def index(docs: list[dict[str, Any]]) -> None: ...


@app.task(batch_size=10)
def total(numbers: list[int]) -> int:
    return sum(numbers)


assert isinstance(index, Task)
assert_type(index, BatchTask[dict[str, Any], None])
# One item per message: delay() takes one item's type.
assert_type(index.delay({"id": 1}), TaskHandle)
index.delay({"id": 1}, {"id": 2})  # type: ignore[call-arg]  # one item per message
index.delay([{"id": 1}])  # type: ignore[arg-type]  # an item, not a list of them
total.delay("x")  # type: ignore[arg-type]
# A plain call runs the function on a list.
assert_type(total([1, 2]), int)
total(3)  # type: ignore[arg-type]


async def send_from_asyncio() -> None:
    assert_type(await total.adelay(3), TaskHandle)
    await total.adelay("x")  # type: ignore[arg-type]
