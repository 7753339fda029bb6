"""Workflows: a chain, a group and a chord, run by a worker in this process.

Run it with ``python examples/workflows.py``: it uses the in-process broker and
result backend (``memory://``), so it needs no server. With a real broker and
backend, set ``MQTASKS_BROKER_URL`` and ``MQTASKS_BACKEND_URL`` and run a worker
with ``mqtasks worker -A examples.workflows``.
"""

from __future__ import annotations

import os

from mqtasks import App
from mqtasks.canvas import chain, chord, group

app = App(
    "workflows",
    broker=os.environ.get("MQTASKS_BROKER_URL", "memory://"),
    backend=os.environ.get("MQTASKS_BACKEND_URL", "memory://"),
)


@app.task(name="workflows.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="workflows.tsum")
def tsum(values: list[int]) -> int:
    return sum(values)


@app.task(name="workflows.alert")
def alert(task_id: str, error: dict[str, str]) -> None:
    print(f"{task_id} failed: {error['type']}: {error['message']}")


def main() -> None:
    from mqtasks.testing import running_worker

    with running_worker(app):
        steps = chain(add.s(1, 2), add.s(3), add.s(4)).on_error(alert.s())
        print("chain:", steps.delay().get(timeout=10))  # ((1 + 2) + 3) + 4 = 10
        print("group:", group(add.s(i, i) for i in range(5)).delay().get(timeout=10))
        print("chord:", chord((add.s(i, i) for i in range(100)), tsum.s()).delay().get(timeout=10))


if __name__ == "__main__":
    main()
