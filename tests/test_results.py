"""Results on memory:// with the memory result backend: get(), states, failures, options,
at-least-once (first outcome wins), deferral, and the errors without a backend."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import structlog

from mqtasks import (
    App,
    BackendError,
    ConfigurationError,
    Message,
    Middleware,
    Reject,
    Results,
    ResultTimeout,
    Settings,
    TaskFailed,
    TaskHandle,
    Worker,
    current_message,
)
from mqtasks.backend.base import ResultWrite
from mqtasks.backend.memory import MemoryBackend
from mqtasks.backend.redis import RedisBackend
from mqtasks.exceptions import SkipMessage
from mqtasks.middleware.results import GroupCommit, current_outcome
from mqtasks.result import (
    DEAD_LETTERED,
    FAILED,
    PENDING,
    RETRYING,
    STARTED,
    SUCCEEDED,
    Outcome,
    decode_outcome,
    encode_outcome,
)
from mqtasks.testing import drain, running_worker
from reliability.proxy import TcpProxy
from tests._helpers.brokers import REDIS_URL, require_broker, unique_name
from tests._helpers.redis import delete_keys
from tests._helpers.servers import free_port


@pytest.fixture
def app(make_app: Callable[..., App]) -> App:
    """An app on memory:// with a memory:// result backend and a run-unique queue."""
    return make_app("memory://", backend="memory://")


# -- without a backend: the failure paths first ------------------------------------------


def test_get_without_a_backend_says_how_to_set_one(make_app: Callable[..., App]) -> None:
    app = make_app("memory://")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    handle = add.delay(1, 2)
    with pytest.raises(ConfigurationError, match="MQTASKS_BACKEND_URL") as info:
        handle.get(timeout=1)
    assert "backend='redis://" in str(info.value)
    with pytest.raises(ConfigurationError):
        app.backend  # noqa: B018
    with pytest.raises(ConfigurationError):
        app.handle(handle.id).state  # noqa: B018


def test_a_handle_without_an_app_cannot_read_a_result() -> None:
    with pytest.raises(ConfigurationError, match=r"app\.handle"):
        TaskHandle("some-id").get()


def test_results_middleware_without_a_backend_is_refused_at_worker_creation(
    make_app: Callable[..., App],
) -> None:
    app = make_app("memory://", middleware=[Results()])

    @app.task
    def noop() -> None: ...

    with pytest.raises(ConfigurationError, match="no result backend"):
        Worker(app)


def test_worker_refuses_to_start_when_the_backend_is_unreachable(
    make_app: Callable[..., App],
) -> None:
    port = free_port()
    app = make_app("memory://", backend=f"redis://:s3cret@127.0.0.1:{port}/0")

    @app.task
    def noop() -> None: ...

    worker = Worker(app)
    with pytest.raises(BackendError, match="cannot be reached") as info:
        worker.start(timeout=10)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_a_backend_url_naming_no_backend_is_refused_at_worker_creation(
    make_app: Callable[..., App],
) -> None:
    app = make_app("memory://", backend="redis2://:pw@localhost/0")

    @app.task
    def noop() -> None: ...

    with pytest.raises(ConfigurationError, match="Did you mean 'redis'") as info:
        Worker(app)
    assert "pw" not in str(info.value)


def test_backend_url_password_is_masked_in_reprs() -> None:
    app = App("masked", broker="memory://", backend="redis://:hunter2@localhost:6379/0")
    assert "hunter2" not in repr(app)
    assert "hunter2" not in repr(app.settings)
    assert "backend=" in repr(app)


def test_result_options_are_known_without_results_in_app_middleware(
    make_app: Callable[..., App],
) -> None:
    app = make_app("memory://", backend="memory://", middleware=[])

    @app.task(ignore_result=True, track_started=True)
    def fine() -> None: ...

    with pytest.raises(ConfigurationError, match="ignore_results"):

        @app.task(ignore_results=True)
        def typo() -> None: ...


def test_a_result_option_that_is_not_a_bool_is_refused(app: App) -> None:
    @app.task(ignore_result="yes")
    def odd() -> None: ...

    with pytest.raises(ConfigurationError, match="ignore_result must be True or False"):
        Worker(app)


def test_result_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "MQTASKS_BACKEND_URL": "redis://localhost:6379/3",
            "MQTASKS_BACKEND_KEY_PREFIX": "shop:",
            "MQTASKS_RESULT_EXPIRES": "60.5",
        }
    )
    assert settings.backend_url == "redis://localhost:6379/3"
    assert settings.backend_key_prefix == "shop:"
    assert settings.result_expires == 60.5
    defaults = Settings.from_env({})
    assert (defaults.backend_url, defaults.result_expires) == (None, 86400.0)
    # An explicit argument wins over the environment
    app = App("x", broker="memory://", backend="memory://", settings=settings)
    assert app.settings.backend_url == "memory://"


def test_settings_validate_result_expires() -> None:
    with pytest.raises(ConfigurationError, match="result_expires"):
        App("x", broker="memory://", result_expires=0)


# -- values and states ---------------------------------------------------------------------


def test_get_returns_the_value(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> dict[str, Any]:
        return {"sum": x + y, "parts": (x, y)}

    handle = add.delay(2, 3)
    assert handle.state == PENDING
    assert not handle.ready()
    with running_worker(app):
        assert handle.get(timeout=10) == {"sum": 5, "parts": [2, 3]}
    assert handle.state == SUCCEEDED
    assert handle.ready() and handle.successful() and not handle.failed()
    assert handle.result == {"sum": 5, "parts": [2, 3]}
    outcome = handle.outcome()
    assert outcome is not None and outcome.task == add.name and outcome.at > 0


def test_app_handle_reads_the_result_by_id(app: App) -> None:
    @app.task
    def double(x: int) -> int:
        return 2 * x

    task_id = double.delay(21).id
    with running_worker(app):
        handle = app.handle(task_id)
        assert handle.task is None and handle.queue is None
        assert handle.get(timeout=10) == 42
        assert str(handle) == task_id


def test_a_pickled_handle_keeps_its_id_and_leaves_the_app_behind(app: App) -> None:
    @app.task
    def noop() -> None: ...

    handle = noop.delay()
    copy = pickle.loads(pickle.dumps(handle))
    assert copy == handle and copy.id == handle.id and copy.task == handle.task
    assert copy.app is None
    with pytest.raises(ConfigurationError, match=r"app\.handle"):
        copy.get(timeout=0.1)


def test_get_times_out_with_result_timeout(app: App) -> None:
    @app.task
    def never_run() -> None: ...

    handle = never_run.delay()
    with pytest.raises(ResultTimeout, match="PENDING") as info:
        handle.get(timeout=0.2)
    assert info.value.task_id == handle.id
    assert info.value.timeout == 0.2
    assert isinstance(info.value, TimeoutError)


def test_aget_waits_without_blocking_the_event_loop(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    async def main() -> tuple[int, int]:
        ticks = 0
        handle = await add.adelay(4, 5)

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        try:
            value = await handle.aget(timeout=10)
        finally:
            ticker.cancel()
        return value, ticks

    with running_worker(app):
        value, ticks = asyncio.run(main())
    assert value == 9
    assert ticks >= 1


def test_forget_deletes_the_result(app: App) -> None:
    @app.task
    def one() -> int:
        return 1

    handle = one.delay()
    with running_worker(app):
        assert handle.get(timeout=10) == 1
    handle.forget()
    assert handle.state == PENDING
    assert handle.result is None
    with pytest.raises(ResultTimeout):
        handle.get(timeout=0.1)


def test_get_inside_a_publishing_block_handle(app: App) -> None:
    @app.task
    def square(x: int) -> int:
        return x * x

    with app.publishing():
        handles = [square.delay(i) for i in range(5)]
    with running_worker(app):
        assert [h.get(timeout=10) for h in handles] == [0, 1, 4, 9, 16]


# -- failures --------------------------------------------------------------------------------


def test_task_failed_after_retries_are_exhausted_with_reason_type_message_traceback(
    app: App,
) -> None:
    seen: list[str] = []

    @app.task(max_retries=2, retry_backoff=0.3)  # RETRYING is stored after the publish
    def flaky() -> None:
        message = current_message()
        assert message is not None
        seen.append(app.handle(message.id).state)
        raise ValueError(f"broken on attempt {message.attempt}")

    handle = flaky.delay()
    with running_worker(app) as worker:
        with pytest.raises(TaskFailed) as info:
            handle.get(timeout=10)
        drain(worker, raise_errors=False)
    error = info.value
    assert error.task_id == handle.id
    assert error.state == DEAD_LETTERED
    assert error.reason == "max_retries_exceeded"
    assert error.exc_type == "ValueError"
    assert error.exc_message == "broken on attempt 3"
    assert error.traceback is not None and 'raise ValueError(f"broken on attempt' in error.traceback
    assert "max_retries_exceeded" in str(error) and "ValueError" in str(error)
    # Attempts 2 and 3 saw the RETRYING outcome the earlier failure stored.
    assert seen == [PENDING, RETRYING, RETRYING]
    assert handle.state == DEAD_LETTERED and handle.failed() and not handle.successful()
    assert handle.result is None


def test_get_with_propagate_false_returns_the_failure(app: App) -> None:
    @app.task(max_retries=0)
    def boom() -> None:
        raise KeyError("missing")

    handle = boom.delay()
    with running_worker(app):
        error = handle.get(timeout=10, propagate=False)
    assert isinstance(error, TaskFailed)
    assert error.exc_type == "KeyError"


def test_reject_is_dead_lettered_with_its_reason(app: App) -> None:
    @app.task
    def refuse() -> None:
        raise Reject("not for us")

    handle = refuse.delay()
    with running_worker(app), pytest.raises(TaskFailed) as info:
        handle.get(timeout=10)
    assert info.value.reason == "rejected"
    assert info.value.exc_type == "Reject"
    assert info.value.exc_message == "not for us"


def test_a_value_json_cannot_carry_is_stored_as_failed_and_not_retried(app: App) -> None:
    runs: list[int] = []

    @app.task(max_retries=3, retry_backoff=0)
    def returns_a_set() -> set[int]:
        runs.append(1)
        return {1, 2}

    handle = returns_a_set.delay()
    with structlog.testing.capture_logs() as logs, running_worker(app) as worker:
        with pytest.raises(TaskFailed) as info:
            handle.get(timeout=10)
        drain(worker)
    assert info.value.state == FAILED
    assert info.value.exc_type == "EncodeError"
    assert "cannot be stored as JSON" in (info.value.exc_message or "")
    assert runs == [1]
    assert [e["task_id"] for e in logs if e["event"] == "result.unencodable"] == [handle.id]


def test_a_value_over_max_message_size_is_stored_as_failed(
    make_app: Callable[..., App],
) -> None:
    app = make_app("memory://", backend="memory://", max_message_size=4096)

    @app.task
    def big() -> str:
        return "x" * 10_000

    handle = big.delay()
    with running_worker(app), pytest.raises(TaskFailed, match="4096-byte limit") as info:
        handle.get(timeout=10)
    assert info.value.exc_type == "EncodeError"


def test_unknown_task_with_a_known_id_is_stored_dead_lettered(app: App) -> None:
    @app.task
    def known() -> None: ...

    message = Message(id="unknown-task-id", task="nobody.registered.this", queue=known.queue)
    app.send(message)
    with running_worker(app) as worker:
        with pytest.raises(TaskFailed) as info:
            app.handle(message.id).get(timeout=10)
        drain(worker, raise_errors=False)
    assert info.value.reason == "unknown_task"
    assert info.value.state == DEAD_LETTERED


# -- options ------------------------------------------------------------------------------------


def test_ignore_result_stores_nothing(app: App) -> None:
    @app.task(ignore_result=True)
    def quiet() -> int:
        return 7

    @app.task(ignore_result=True, max_retries=0)
    def quiet_failure() -> None:
        raise ValueError("no one listens")

    handles = [quiet.delay(), quiet_failure.delay()]
    with running_worker(app) as worker:
        drain(worker, raise_errors=False)
    for handle in handles:
        assert handle.state == PENDING
        with pytest.raises(ResultTimeout):
            handle.get(timeout=0.1)


def test_track_started_stores_started_while_the_task_runs(app: App) -> None:
    states: dict[str, str] = {}

    @app.task(track_started=True)
    def tracked() -> None:
        message = current_message()
        assert message is not None
        states["tracked"] = app.handle(message.id).state

    @app.task
    def untracked() -> None:
        message = current_message()
        assert message is not None
        states["untracked"] = app.handle(message.id).state

    handles = [tracked.delay(), untracked.delay()]
    with running_worker(app):
        for handle in handles:
            handle.get(timeout=10)
    assert states == {"tracked": STARTED, "untracked": PENDING}


# -- at-least-once: the first outcome wins -------------------------------------------------------


class _SeeOutcome(Middleware):
    """Installed before Results: its after_process sees what Results stored."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome | None] = []

    def after_process(
        self, worker: Worker, message: Message, *, result: Any = None, exception: Any = None
    ) -> None:
        self.outcomes.append(current_outcome())


def test_a_message_processed_twice_keeps_its_first_outcome(make_app: Callable[..., App]) -> None:
    seer = _SeeOutcome()
    app = make_app("memory://", backend="memory://", middleware=[seer])

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    # Given the same message id sent twice (as a redelivery after a crash would run it)
    task_id = "same-id-twice"
    with running_worker(app, concurrency=1) as worker:
        add.apply_async((1, 2), task_id=task_id)
        drain(worker)
        add.apply_async((10, 20), task_id=task_id)
        drain(worker)
    # Then both ran, and the first outcome is the result, for the second run too
    assert app.handle(task_id).get(timeout=1) == 3
    assert [o.value if o else None for o in seer.outcomes] == [3, 3]
    assert all(o is not None and o.state == SUCCEEDED for o in seer.outcomes)


# -- deferral ------------------------------------------------------------------------------------


class _DeferOnce(Middleware):
    """Defers each message once from before_process, then lets it run."""

    def __init__(self) -> None:
        self.deferred: set[str] = set()
        self._lock = threading.Lock()

    def before_process(self, worker: Worker, message: Message) -> None:
        with self._lock:
            if message.id in self.deferred:
                return
            self.deferred.add(message.id)
        worker.defer(message, 0.2, "test_defer")
        raise SkipMessage("deferred")


def test_defer_from_before_process_runs_the_message_later(make_app: Callable[..., App]) -> None:
    deferrer = _DeferOnce()
    app = make_app("memory://", backend="memory://", middleware=[deferrer])
    runs: list[int] = []

    @app.task
    def add(x: int, y: int) -> int:
        runs.append(1)
        return x + y

    handle = add.delay(2, 2)
    with structlog.testing.capture_logs() as logs, running_worker(app):
        assert handle.get(timeout=10) == 4
    assert runs == [1]
    assert deferrer.deferred == {handle.id}
    deferred = [e for e in logs if e["event"] == "task.deferred"]
    assert [(e["task_id"], e["reason"], e["attempt"]) for e in deferred] == [
        (handle.id, "test_defer", 1)
    ]


def test_defer_outside_a_message_is_refused(app: App) -> None:
    worker = Worker(app)
    message = Message(id="x", task="t", queue="q")
    with pytest.raises(RuntimeError, match="before_process"):
        worker.defer(message, 1.0, "nope")


# -- the record format ----------------------------------------------------------------------------


def test_outcome_records_round_trip() -> None:
    try:
        raise RuntimeError("token=abc password=hunter2 failed")
    except RuntimeError as exc:
        record = encode_outcome(
            DEAD_LETTERED, task="t.x", exception=exc, reason="rejected", max_size=10_000
        )
    outcome = decode_outcome(record)
    assert outcome.state == DEAD_LETTERED and outcome.final and outcome.failed
    assert outcome.reason == "rejected"
    assert outcome.error_type == "RuntimeError"
    assert outcome.to_dict()["error"]["type"] == "RuntimeError"
    with pytest.raises(TaskFailed, match="rejected"):
        outcome.raise_for_failure("id-1")
    ok = decode_outcome(encode_outcome(SUCCEEDED, task="t.x", value=[1, "a"], max_size=1000))
    assert ok.value == [1, "a"] and ok.succeeded and ok.error("id") is None
    with pytest.raises(ValueError, match="state"):
        encode_outcome("DONE", task="t", max_size=100)
    with pytest.raises(BackendError, match="not an outcome record"):
        decode_outcome(b"not json")


def test_a_workflow_failure_names_the_failed_step() -> None:
    record = encode_outcome(
        FAILED, task="t.last", reason="max_retries_exceeded", failed_task_id="step-1", max_size=100
    )
    error = decode_outcome(record).error("last-step")
    assert error is not None
    assert error.task_id == "step-1"
    assert "so last-step has no result" in str(error)


# -- the testing helpers ------------------------------------------------------------------------


def test_pytest_fixtures_wait_for_a_result_and_reset_the_backend(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        from mqtasks.testing import memory_app, reset, running_worker

        def test_fixture(mqtasks_app, mqtasks_start_worker):
            @mqtasks_app.task
            def add(x: int, y: int) -> int:
                return x + y

            mqtasks_start_worker()
            assert add.delay(2, 3).get(timeout=5) == 5

        def test_memory_app_and_reset():
            app = memory_app()

            @app.task
            def one() -> int:
                return 1

            handle = one.delay()
            with running_worker(app):
                assert handle.get(timeout=5) == 1
            reset(app)
            assert handle.state == "PENDING"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


# -- group commit: results of threads that finish together, written together -----------------


class _RecordingBackend(MemoryBackend):
    """The memory backend, noting the size of each store_results call; the first is slow,
    so that the other threads' results queue behind it."""

    def __init__(self) -> None:
        super().__init__("memory://")
        self.batches: list[int] = []

    def store_results(self, items: Sequence[ResultWrite]) -> list[bool]:
        self.batches.append(len(items))
        if len(self.batches) == 1:
            time.sleep(0.3)
        return super().store_results(items)


def test_group_commit_writes_what_queued_during_a_write_in_one_call() -> None:
    backend = _RecordingBackend()
    commit = GroupCommit()
    backend.store_result("ran-before", b"first", final=True, expires=60)
    ids = [f"t{i}" for i in range(7)] + ["ran-before"]
    barrier = threading.Barrier(len(ids))

    def store(task_id: str) -> bool:
        barrier.wait(10)
        return commit.store(backend, ResultWrite(task_id, task_id.encode(), True, 60))

    with ThreadPoolExecutor(len(ids)) as pool:
        written = list(pool.map(store, ids, timeout=30))

    # Each thread learns whether its own result was written
    assert written == [True] * 7 + [False]
    assert backend.get_results(ids) == [(i.encode(), True) for i in ids[:7]] + [(b"first", True)]
    # and the results that queued while the first write was under way went together
    assert sum(backend.batches) == len(ids)
    assert len(backend.batches) <= 3 and max(backend.batches) >= 4, backend.batches


def test_a_result_stored_alone_is_written_by_its_own_thread_at_once() -> None:
    backend = _RecordingBackend()
    commit = GroupCommit()
    backend.batches.append(0)  # no slow first call

    assert commit.store(backend, ResultWrite("t", b"x", True, 60)) is True
    assert commit.store(backend, ResultWrite("t", b"y", True, 60)) is False
    assert backend.batches == [0, 1, 1]
    assert backend.get_result("t") == (b"x", True)


@pytest.mark.integration
def test_group_commit_gives_each_thread_of_a_failed_write_its_own_error() -> None:
    require_broker("redis")
    proxy = TcpProxy(6379)
    prefix = unique_name("gc") + ":"
    backend = RedisBackend(proxy.url_for(REDIS_URL), key_prefix=prefix, socket_timeout=0.5)
    commit = GroupCommit()
    try:
        backend.check()
        # Given a backend that stops answering while threads store results
        proxy.blackhole()
        barrier = threading.Barrier(5)

        def store(i: int) -> BaseException | bool:
            barrier.wait(10)
            try:
                return commit.store(backend, ResultWrite(f"t{i}", b"x", True, 60))
            except BackendError as exc:
                return exc

        with ThreadPoolExecutor(5) as pool:
            outcomes = list(pool.map(store, range(5), timeout=60))

        # Then every thread gets a BackendError of its own, none a result
        assert all(isinstance(o, BackendError) for o in outcomes), outcomes
        assert len({id(o) for o in outcomes}) == 5
        # And once the backend answers again, the next store is written
        proxy.blackhole(False)
        assert commit.store(backend, ResultWrite("t0", b"x", True, 60)) is True
    finally:
        backend.close()
        proxy.close()
        delete_keys(prefix)


def test_ignore_result_does_not_encode_the_value(make_app: Callable[..., App]) -> None:
    seer = _SeeOutcome()
    app = make_app("memory://", backend="memory://", middleware=[seer], max_message_size=1024)

    @app.task(ignore_result=True)
    def big() -> str:
        return "x" * 4096

    handle = big.delay()
    with running_worker(app) as worker:
        drain(worker)

    # Nothing stored, so no limit applies: the workflow middleware sees the value
    outcome = seer.outcomes[0]
    assert outcome is not None and outcome.state == SUCCEEDED and outcome.value == "x" * 4096
    assert handle.state == PENDING
