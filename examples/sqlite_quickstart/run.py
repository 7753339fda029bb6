"""The whole SQLite quickstart in one command: ``python -m examples.sqlite_quickstart.run``.

It starts a real ``mqtasks worker`` process on the database file, sends the
tasks from this process (as a web app would), waits until the file holds
nothing but the dead letter, lists that dead letter, and stops the worker with
SIGTERM (it finishes what it runs first).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .app import BROKER_URL, app, charge_card
from .send import send


def settled() -> bool:
    """Whether every queue is empty (nothing ready, running or waiting) and the
    failed payment is dead-lettered."""
    stats = app.transport.queue_stats([app.queue(q) for q in app.task_queues()])
    idle = all(s.ready == 0 and s.unacked == 0 and s.delayed == 0 for s in stats.values())
    return idle and any(s.dead_lettered for s in stats.values())


def main() -> int:
    # The worker runs from the repository root: give it the file's absolute path.
    url = f"sqlite:///{Path(BROKER_URL.removeprefix('sqlite:///')).resolve()}"
    print(f"broker: {url}")
    env = {**os.environ, "MQTASKS_BROKER_URL": url, "PYTHONUNBUFFERED": "1"}
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryFile("w+") as output:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mqtasks",
                "worker",
                "-A",
                "examples.sqlite_quickstart.app",
                "-c",
                "1",
            ],
            cwd=root,
            env=env,
            stdout=output,
            stderr=subprocess.DEVNULL,
        )
        try:
            for task_id in send():
                print("sent", task_id)
            deadline = time.monotonic() + 60
            while not settled():
                if time.monotonic() > deadline or worker.poll() is not None:
                    print("the worker did not finish the tasks", file=sys.stderr)
                    return 1
                time.sleep(0.1)
        finally:
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(30)
        output.seek(0)
        for line in output.read().splitlines():
            print("worker:", line)
    for entry in app.dead_letters(charge_card.queue):
        print(f"dead letter: {entry.task} {entry.reason} after {entry.attempts} attempts")
    app.close()
    print(f"worker exited with {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
