"""The harness's app: workload tasks and a middleware that writes the ledger.

Workers run it as ``python -m mqtasks worker -A reliability.tasks``; it is
configured entirely from the environment the harness sets:

* ``MQTASKS_BROKER_URL``, ``MQTASKS_QUEUE_TYPE`` and other ``MQTASKS_*`` settings;
* ``RELIABILITY_QUEUE``: the run's work queue (every task is sent there);
* ``RELIABILITY_LEDGER_DIR``: where each process appends its ledger file;
* ``RELIABILITY_DELIVERY_LIMIT``: the queue's ``delivery_limit``, if any;
* ``RELIABILITY_TRANSPORT_OPTIONS``: JSON transport options (Redis sweep, prefix);
* ``RELIABILITY_QUEUE_OPTIONS``: JSON fields of the work queue's ``QueueSpec``
  (``max_length``, ``overflow``, ``message_ttl``...).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import tenacity

from mqtasks import App, Middleware
from mqtasks.transport import QueueSpec

from .ledger import LedgerWriter

if TYPE_CHECKING:
    from mqtasks.message import Message
    from mqtasks.worker import Worker

__all__ = ["LedgerMiddleware", "app", "build_app"]

#: Queue used when ``RELIABILITY_QUEUE`` is not set.
DEFAULT_QUEUE = "rel.work"


class LedgerMiddleware(Middleware):
    """Records ``start`` before every task runs and ``done`` after it returned.

    One ledger file per process (``worker-<pid>.jsonl``), opened on first use,
    so a worker that forks or restarts never shares a file.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self._writer: LedgerWriter | None = None
        self._pid = 0

    def writer(self) -> LedgerWriter | None:
        """This process's ledger, or None when no directory is configured."""
        if self.directory is None:
            return None
        if self._writer is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._writer = LedgerWriter(os.path.join(self.directory, f"worker-{self._pid}.jsonl"))
        return self._writer

    def before_process(self, worker: Worker, message: Message) -> None:
        w = self.writer()
        if w is not None:
            w.record("start", message.id, attempt=message.attempt, task=message.task)

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        w = self.writer()
        if w is not None and exception is None:
            w.record("done", message.id, attempt=message.attempt)


def build_app(environ: dict[str, str] | None = None) -> App:
    """Build the harness's app from ``environ`` (``os.environ`` by default)."""
    env = dict(os.environ if environ is None else environ)
    queue = env.get("RELIABILITY_QUEUE") or DEFAULT_QUEUE
    limit = env.get("RELIABILITY_DELIVERY_LIMIT")
    options = json.loads(env.get("RELIABILITY_TRANSPORT_OPTIONS") or "{}")
    queue_options = json.loads(env.get("RELIABILITY_QUEUE_OPTIONS") or "{}")
    spec = QueueSpec(queue, delivery_limit=int(limit) if limit else None, **queue_options)
    rel = App(
        "reliability",
        broker=env.get("MQTASKS_BROKER_URL"),
        queue_type=env.get("MQTASKS_QUEUE_TYPE"),
        publish_timeout=float(env.get("MQTASKS_PUBLISH_TIMEOUT") or 10.0),
        heartbeat=float(env.get("MQTASKS_HEARTBEAT") or 10.0),
        durability=env.get("MQTASKS_DURABILITY"),
        default_queue=queue,
        queues=[spec],
        middleware=[LedgerMiddleware(env.get("RELIABILITY_LEDGER_DIR"))],
        transport_options=options,
    )
    _register(rel)
    return rel


class Unavailable(RuntimeError):
    """The fake dependency of the retry storm is down."""


def _register(rel: App) -> None:
    @rel.task(name="rel.work")
    def work(task_id: str, ms: float) -> None:
        """W-mix / W-noop: sleep ``ms`` milliseconds."""
        if ms > 0:
            time.sleep(ms / 1000.0)

    @rel.task(
        name="rel.fail",
        max_retries=3,
        # 0.2, 0.4, 0.8 s: no jitter, so the schedule can be checked.
        retry_backoff=tenacity.wait_exponential(multiplier=0.2, exp_base=2),
    )
    def fail(task_id: str) -> None:
        """Always raises: retried, then dead-lettered as ``max_retries_exceeded``."""
        raise RuntimeError(f"rel.fail {task_id} always fails")

    @rel.task(name="rel.crash", max_retries=0)
    def crash(task_id: str) -> None:
        """Kills its own worker process every time (a crash loop)."""
        os.kill(os.getpid(), signal.SIGKILL)

    @rel.task(
        name="rel.flaky",
        max_retries=10,
        # Full jitter, base 1 s, cap 30 s (the retry-storm scenario).
        retry_backoff=tenacity.wait_random_exponential(multiplier=1, max=30),
    )
    def flaky(task_id: str, healthy_at: float) -> None:
        """Raises until the epoch time ``healthy_at``, then succeeds."""
        if time.time() < healthy_at:
            raise Unavailable("the dependency is down")

    @rel.task(
        name="rel.expiring",
        max_retries=10,
        retry_backoff=tenacity.wait_exponential(multiplier=2, exp_base=2),  # 2, 4, 8, 16 s
    )
    def expiring(task_id: str) -> None:
        """Always raises; sent with ``expires`` shorter than its retry schedule."""
        raise RuntimeError(f"rel.expiring {task_id} always fails")

    @rel.task(name="rel.leak", max_retries=0)
    def leak(task_id: str) -> None:
        """Raises an error quoting the broker URL and each of its passwords (redaction)."""
        from urllib.parse import urlsplit

        url = rel.settings.broker_url
        passwords = [urlsplit(u).password or "" for u in url.split(";") if "://" in u]
        raise RuntimeError(
            f"rel.leak {task_id}: lost the broker at {url} (passwords {' '.join(passwords)})"
        )


#: The app ``-A reliability.tasks`` loads.
app = build_app()
