"""mqtasks in one file: define tasks, send them, run them, on the embedded broker.

Run it with ``python examples/quickstart.py``. It needs no server: the broker is
``memory://``, and the worker runs in background threads of this process. Set
``MQTASKS_BROKER_URL`` (for example ``amqp://guest:guest@127.0.0.1//``) to run the
same code against a real broker.
"""

from __future__ import annotations

import os
import sys
import threading

from mqtasks import App, Worker
from mqtasks.testing import drain

app = App("quickstart", broker=os.environ.get("MQTASKS_BROKER_URL", "memory://"))
results: list[str] = []
lock = threading.Lock()


@app.task
def add(x: int, y: int) -> int:
    """Add two numbers and note the result."""
    with lock:
        results.append(f"add({x}, {y}) = {x + y}")
    return x + y


@app.task(queue="emails")
def send_welcome(user_id: int) -> None:
    """Pretend to e-mail a new user."""
    with lock:
        results.append(f"welcome e-mail sent to user {user_id}")


@app.task(max_retries=0)
def flaky(n: int) -> None:
    """Fail, to show how a failing task is reported (and dead-lettered: no retries)."""
    raise ValueError(f"flaky({n}) failed on purpose")


def main() -> int:
    print(f"broker: {app.transport!r}")
    # 1. Send: each delay() returns once the broker has the message.
    for i in range(3):
        handle = add.delay(i, 10)
        print(f"sent add({i}, 10) as task {handle.id}")
    print(f"sent send_welcome(42) as task {send_welcome.delay(42).id}")
    print(f"sent flaky(1) as task {flaky.delay(1).id}")

    # 2. Run: a worker consumes every queue the app's tasks use.
    worker = Worker(app, concurrency=2, collect_errors=True, shutdown_timeout=5)
    worker.start()
    try:
        drain(worker)
    except ValueError as exc:  # drain() re-raises the first task error
        print(f"a task failed, as expected: {exc}")
        drain(worker)
    finally:
        worker.stop()
        app.close()

    # 3. Look: what the tasks did.
    for line in sorted(results):
        print("done:", line)
    return 0 if len(results) == 4 else 1


if __name__ == "__main__":
    sys.exit(main())
