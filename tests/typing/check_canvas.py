"""Pins the types of signatures and workflows; checked by mypy (tox -e type), never run."""

from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

from mqtasks import App, TaskHandle
from mqtasks.canvas import (
    Chain,
    ChainGroup,
    ChainHandle,
    Chord,
    Group,
    GroupHandle,
    Signature,
    chain,
    chord,
    group,
)

app = App("typing", backend="memory://")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def text(value: int) -> str:
    return str(value)


@app.task
def total(values: list[int]) -> float:
    return float(sum(values))


# A signature carries its task's result type.
assert_type(add.s(1, 2), Signature[int])
assert_type(add.si(1, 2), Signature[int])
assert_type(text.s(), Signature[str])
assert_type(add.s(1).set(queue="q", priority=3, countdown=1.5), Signature[int])
assert_type(add.s(1).on_error(text.s()), Signature[int])
assert_type(add.s(1, 2).delay(), TaskHandle)

# A chain's result type is its last step's, for one to six steps.
assert_type(chain(add.s(1, 2)), Chain[int])
assert_type(chain(add.s(1, 2), text.s()), Chain[str])
assert_type(chain(add.s(1, 2), add.s(3), text.s()), Chain[str])
assert_type(chain(add.s(1, 2), add.s(3), add.s(4), total.si([1])), Chain[float])
assert_type(chain(add.s(1, 2), add.s(3), add.s(4), add.s(5), text.s()), Chain[str])
assert_type(chain(add.s(1, 2), add.s(3), add.s(4), add.s(5), add.s(6), add.s(7)), Chain[int])
# More steps: Chain[Any].
assert_type(
    chain(add.s(1, 2), add.s(3), add.s(4), add.s(5), add.s(6), add.s(7), text.s()), Chain[Any]
)
assert_type(add.s(1, 2) | text.s(), Chain[str])
assert_type(chain(add.s(1, 2), text.s()).delay(), ChainHandle)
# A chain may end in a group: its value is the members' list.
assert_type(chain(add.s(1, 2), group([text.s()])), ChainGroup[str])
assert_type(chain(add.s(1, 2), add.s(3), group([text.s()])).delay(), GroupHandle[str])
assert_type(add.s(1, 2) | group([text.s()]), ChainGroup[str])
chain(group([add.s(1, 2)]), add.s(1))  # type: ignore[call-overload]  # only as the last step

# A group's values are a list of its members' type.
assert_type(group([add.s(1, 2), add.s(3, 4)]), Group[int])
assert_type(group(add.s(i, i) for i in range(3)), Group[int])
assert_type(group([add.s(1, 2)]).delay(), GroupHandle[int])
assert_type(group([add.s(1, 2)]).delay().get(timeout=1), list[int])

# A chord's value is its callback's.
assert_type(chord([add.s(1, 2)], total.s()), Chord[float])
assert_type(chord(group([add.s(1, 2)]), text.si(1)), Chord[str])
assert_type(chord([add.s(1, 2)], total.s()).delay(), TaskHandle)
