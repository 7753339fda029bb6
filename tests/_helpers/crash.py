"""Worker subprocesses on the app of ``tests/crash_app.py``, for tests where a worker dies.

A :class:`Crash` is one broker, one queue, one record file and the app that
publishes to them; :meth:`Crash.start` runs ``mqtasks worker -A tests.crash_app``
on them. The ``crash`` fixture (``tests/conftest.py``) makes them and kills their
workers afterwards.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests import crash_app

from .brokers import cleanup, require_broker, unique_name
from .cli import PYTHON, ROOT, CliWorker, clean_env
from .redis import delete_keys, scan_pattern

__all__ = ["WORKER", "Crash"]

#: The worker command line, on the app of ``tests/crash_app.py``.
WORKER = [PYTHON, "-m", "mqtasks", "worker", "-A", "tests.crash_app"]


class Crash:
    """One broker, queue, record file and publishing app for a worker subprocess.

    Args:
        kind: The broker: ``amqp``, ``redis``, or ``amqp-classic`` (RabbitMQ with
            classic queues, through ``MQTASKS_QUEUE_TYPE``).
        tmp_path: Where the record file and the workers' output go.
    """

    def __init__(self, kind: str, tmp_path: Path) -> None:
        kind, _, queue_type = kind.partition("-")
        self.kind = kind
        self.url = require_broker(kind)
        self.queue_type = queue_type or None
        self.queue = unique_name("crash")
        self.record = tmp_path / "record"
        self.tmp_path = tmp_path
        self.options: dict[str, Any] = {}
        if kind == "redis":
            # Keys of our own; a killed worker's messages come back within about 1.5 s.
            self.options = {
                "key_prefix": "{" + self.queue + "}",
                "liveness_ttl": 1.0,
                "sweep_interval": 0.25,
            }
        self.app = crash_app.make_app(self.url, self.queue, self.options, self.queue_type)
        self.workers: list[CliWorker] = []

    def start(self, *args: str, **env: str) -> CliWorker:
        """Start a worker with command-line ``args`` and environment variables ``env``."""
        n = len(self.workers)
        stderr, stdout = self.tmp_path / f"worker-{n}.err", self.tmp_path / f"worker-{n}.out"
        if self.queue_type is not None:
            env = {"MQTASKS_QUEUE_TYPE": self.queue_type, **env}
        environ = clean_env(
            MQTASKS_BROKER_URL=self.url,
            CRASH_TEST_QUEUE=self.queue,
            CRASH_TEST_RECORD=str(self.record),
            CRASH_TEST_TRANSPORT_OPTIONS=json.dumps(self.options),
            **env,
        )
        with open(stderr, "ab") as err, open(stdout, "ab") as out:
            proc = subprocess.Popen(
                [*WORKER, "--log-format", "json", *args],
                cwd=ROOT,
                env=environ,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        worker = CliWorker(proc, stderr, stdout)
        self.workers.append(worker)
        return worker

    def proc_pattern(self) -> str:
        """SCAN pattern of this set-up's Redis processing lists."""
        return scan_pattern(str(self.options["key_prefix"])) + ":proc:*"

    def events(self, event: str, tag: str) -> list[int]:
        """Pids that recorded ``event`` for ``tag``, in order."""
        return [p for e, t, p in crash_app.read_record(self.record) if e == event and t == tag]

    def close(self) -> None:
        """Kill every worker started, and delete the queue's messages and keys."""
        for worker in self.workers:
            worker.kill()
        if self.kind == "redis":
            delete_keys(self.options["key_prefix"])
        cleanup(self.app)
