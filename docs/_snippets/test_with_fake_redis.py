"""Testing tasks on the redis:// transport with no Redis server (docs/guide/testing.rst)."""

from __future__ import annotations

import pytest

from mqtasks import App, Retry, Task, current_message
from mqtasks.testing import drain


@pytest.fixture
def attempts() -> list[int]:
    return []


@pytest.fixture
def charge(mqtasks_fake_redis_app: App, attempts: list[int]) -> Task[[int], None]:
    """Register the task before the worker starts, as with ``mqtasks_app``."""

    @mqtasks_fake_redis_app.task(queue="payments", max_retries=2, retry_backoff=0.1)
    def charge_card(amount: int) -> None:
        message = current_message()
        assert message is not None
        attempts.append(message.attempt)
        if amount < 0:
            raise ValueError("card refused")
        if message.attempt == 1:
            raise Retry(countdown=0.2)  # held in Redis' delayed set, then run again

    return charge_card


def test_a_retry_runs_again_after_its_delay(charge, mqtasks_fake_redis_worker, attempts):
    charge.delay(10)
    drain(mqtasks_fake_redis_worker)  # waits for delayed messages too
    assert attempts == [1, 2]


def test_a_task_that_keeps_failing_is_dead_lettered(
    charge, mqtasks_fake_redis_app, mqtasks_fake_redis_worker
):
    charge.delay(-5)
    with pytest.raises(ValueError, match="card refused"):
        drain(mqtasks_fake_redis_worker)
    [dead] = mqtasks_fake_redis_app.dead_letters("payments")
    assert (dead.reason, dead.attempts) == ("max_retries_exceeded", 3)
