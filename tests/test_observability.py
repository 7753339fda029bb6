"""The hooks observability middleware relies on, the default stack, and the custom-metric example."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import tenacity

from mqtasks import App, EncodeError, Message, Middleware, Reject, Settings, Worker
from mqtasks.exceptions import SkipMessage
from mqtasks.middleware import (
    OpenTelemetryTracing,
    StatsdMetrics,
    StructlogContext,
    default_middleware,
    overriding,
)
from mqtasks.testing import drain, memory_app, reset, running_worker
from tests._helpers.cli import ROOT
from tests._helpers.publish import raw_publish
from tests._helpers.statsd import StatsdServer


class Journal(Middleware):
    """Writes down every hook call it gets, as ``name.hook:detail``."""

    def __init__(self, name: str, calls: list[str], skip: bool = False) -> None:
        self.name, self.calls, self.skip = name, calls, skip

    def after_publish_error(self, app: App, message: Message, exception: BaseException) -> None:
        self.calls.append(f"{self.name}.after_publish_error:{type(exception).__name__}")

    def before_process(self, worker: Worker, message: Message) -> None:
        self.calls.append(f"{self.name}.before_process:{message.attempt}")
        if self.skip:
            raise SkipMessage("not today")

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        self.calls.append(f"{self.name}.after_process:{type(exception).__name__}")

    def after_retry(
        self, worker: Worker, message: Message, delay: float, exception: BaseException
    ) -> None:
        self.calls.append(f"{self.name}.after_retry:{delay}")

    def after_reject(self, worker: Worker, message: Message | None, reason: str) -> None:
        self.calls.append(f"{self.name}.after_reject:{reason}")

    def after_dead_letter(self, worker: Worker, message: Message | None, reason: str) -> None:
        self.calls.append(f"{self.name}.after_dead_letter:{reason}")


@pytest.fixture
def app() -> Any:
    app = memory_app()
    yield app
    reset(app)


def test_a_failed_publish_reaches_after_publish_error_not_after_publish(app: App) -> None:
    calls: list[str] = []
    app.middleware[:] = [Journal("a", calls), Journal("b", calls)]

    @app.task
    def store(value: Any) -> None: ...

    with pytest.raises(EncodeError):
        store.delay(object())
    with pytest.raises(EncodeError):
        store.map([1, object()])
    assert calls == ["b.after_publish_error:EncodeError", "a.after_publish_error:EncodeError"] * 3


def test_retry_and_dead_letter_hooks_run_before_after_process(app: App) -> None:
    calls: list[str] = []
    app.middleware[:] = [Journal("a", calls)]

    @app.task(max_retries=1, retry_backoff=tenacity.wait_fixed(0.01))
    def boom() -> None:
        raise RuntimeError("no")

    boom.delay()
    with running_worker(app) as worker:
        drain(worker, raise_errors=False)
    assert calls == [
        "a.before_process:1",
        "a.after_retry:0.01",
        "a.after_process:RuntimeError",
        "a.before_process:2",
        "a.after_dead_letter:max_retries_exceeded",
        "a.after_process:RuntimeError",
    ]


def test_rejections_reach_after_reject_then_after_dead_letter(app: App) -> None:
    calls: list[str] = []
    app.middleware[:] = [Journal("a", calls)]

    @app.task
    def refuse() -> None:
        raise Reject("bad")

    refuse.delay()
    raw_publish(app, app.settings.default_queue, b"{not json", content_type="application/json")
    with running_worker(app) as worker:
        drain(worker, raise_errors=False)
    # The undecodable message gets no before/after_process: it never ran
    assert sorted(calls) == sorted(
        [
            "a.before_process:1",
            "a.after_reject:rejected",
            "a.after_dead_letter:rejected",
            "a.after_process:Reject",
            "a.after_reject:invalid_headers",
            "a.after_dead_letter:invalid_headers",
        ]
    )
    assert calls.index("a.after_dead_letter:rejected") < calls.index("a.after_process:Reject")


def test_skip_message_closes_only_the_brackets_opened_before_it(app: App) -> None:
    calls: list[str] = []
    app.middleware[:] = [Journal("a", calls), Journal("b", calls, skip=True), Journal("c", calls)]
    ran: list[int] = []

    @app.task
    def work() -> None:
        ran.append(1)

    work.delay()
    with running_worker(app) as worker:
        drain(worker)
    assert not ran
    assert calls == ["a.before_process:1", "b.before_process:1", "a.after_process:SkipMessage"]


def test_only_overridden_hooks_are_called() -> None:
    class OnlyRetries(Middleware):
        def after_retry(self, *args: Any) -> None: ...

    class Instance(Middleware): ...

    special = Instance()
    special.before_process = lambda worker, message: None  # type: ignore[method-assign]
    mws = [OnlyRetries(), Middleware(), special]
    assert overriding(mws, "after_retry") == [mws[0].after_retry]
    assert overriding(mws, "before_process") == [special.before_process]
    assert overriding(mws, "after_process") == []


def test_default_stack_follows_the_settings(statsd_server: StatsdServer) -> None:
    assert [type(m) for m in default_middleware(Settings())] == [
        OpenTelemetryTracing,
        StructlogContext,
    ]
    settings = Settings(statsd_url=statsd_server.url, tracing=False, log_task_args=True)
    stack = default_middleware(settings)
    assert [type(m) for m in stack] == [StructlogContext, StatsdMetrics]
    assert stack[0].log_args is True  # type: ignore[attr-defined]
    assert memory_app(middleware=[]).middleware == []
    with pytest.raises(Exception, match="MQTASKS_TRACING='maybe' is not a boolean"):
        Settings.from_env({"MQTASKS_TRACING": "maybe"})


def test_custom_metric_example_counts_slow_tasks(statsd_server: StatsdServer) -> None:
    from examples import custom_metric

    app = custom_metric.make_app(statsd_server.url, threshold=0.05)
    build = app.tasks["reports.build"]
    try:
        build.delay(0.0)
        build.delay(0.2)
        with running_worker(app) as worker:
            drain(worker)
    finally:
        reset(app)
    statsd_server.wait_for(
        lambda: statsd_server.count("mqtasks.task.succeeded.reports_build") == 2, "both runs"
    )
    assert statsd_server.count("mqtasks.task.slow.reports_build") == 1


def test_custom_metric_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, "examples/custom_metric.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "counted as mqtasks.task.slow.reports_build" in result.stdout
