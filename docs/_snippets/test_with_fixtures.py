"""Testing tasks with the mqtasks pytest fixtures (shown in docs/guide/testing.rst)."""

from __future__ import annotations

import pytest

from mqtasks import App, Task
from mqtasks.testing import drain


@pytest.fixture
def sent() -> list[str]:
    return []


@pytest.fixture
def welcome(mqtasks_app: App, sent: list[str]) -> Task[[int], None]:
    """Register the task on the test's app, before the worker starts."""

    @mqtasks_app.task(queue="emails")
    def send_welcome(user_id: int) -> None:
        if user_id < 0:
            raise ValueError("no such user")
        sent.append(f"welcome {user_id}")

    return send_welcome


def test_welcome_is_sent(welcome, mqtasks_worker, sent):
    welcome.delay(42)
    drain(mqtasks_worker)  # waits until the queues are empty and the worker is idle
    assert sent == ["welcome 42"]


def test_a_failing_task_fails_the_test(welcome, mqtasks_worker):
    welcome.delay(-1)
    with pytest.raises(ValueError, match="no such user"):
        drain(mqtasks_worker)  # re-raises the task's exception
