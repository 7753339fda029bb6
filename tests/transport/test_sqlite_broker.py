"""``sqlite://``: one file shared by worker processes and publishers on one machine.

Real ``mqtasks worker`` subprocesses: a SIGKILLed worker's task runs again after
the lease, two workers on one file never run a task twice; and in process:
delays held by ``run_at``, the delivery limit, dead letters and their tooling,
the counts ``mqtasks status`` reads, the URL forms and the errors of a file
that cannot be used. Each test has a database file of its own in ``tmp_path``.

This module is also the app of the overlap test's workers
(``-A tests.transport.test_sqlite_broker:worker_app``).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from mqtasks import App, ConfigurationError, ConnectionFailed, QueueSpec
from mqtasks.cli import cli
from mqtasks.testing import drain, running_worker
from mqtasks.transport import resolve
from mqtasks.transport.base import Consumer, Delivery
from mqtasks.transport.sqlite import SqliteTransport
from tests import crash_app
from tests._helpers.cli import PYTHON, ROOT, CliWorker, clean_env
from tests._helpers.wait import wait_for


def _record(event: str, tag: str) -> None:
    """Append ``event tag pid monotonic-ns`` to ``SQLITE_TEST_RECORD`` (one write)."""
    line = f"{event} {tag} {os.getpid()} {time.monotonic_ns()}\n".encode()
    fd = os.open(os.environ["SQLITE_TEST_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def make_worker_app(url: str | None = None) -> App:
    """The overlap test's app: ``sqlite.work`` records its start and end."""
    made = App(
        "sqlite_test",
        broker=url or os.environ.get("MQTASKS_BROKER_URL") or "memory://",
        default_queue="work",
        publish_timeout=10.0,
    )

    @made.task(name="sqlite.work", max_retries=0)
    def work(tag: str) -> None:
        _record("start", tag)
        time.sleep(0.01)  # long enough that both workers find work
        _record("end", tag)

    return made


#: The app the overlap test's worker subprocesses load.
worker_app = make_worker_app()


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A database file of this test's own."""
    return f"sqlite:///{tmp_path}/broker.db"


@pytest.fixture
def workers() -> Iterator[list[CliWorker]]:
    """Worker subprocesses of the test, SIGKILLed at teardown."""
    started: list[CliWorker] = []
    yield started
    for worker in started:
        worker.kill()


def start_worker(
    workers: list[CliWorker], tmp_path: Path, app_path: str, *args: str, **env: str
) -> CliWorker:
    n = len(workers)
    stderr, stdout = tmp_path / f"worker-{n}.err", tmp_path / f"worker-{n}.out"
    with open(stderr, "ab") as err, open(stdout, "ab") as out:
        proc = subprocess.Popen(
            [PYTHON, "-m", "mqtasks", "worker", "-A", app_path, "--log-format", "json", *args],
            cwd=ROOT,
            env=clean_env(**env),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    workers.append(CliWorker(proc, stderr, stdout))
    return workers[-1]


# -- worker processes ------------------------------------------------------------


def test_a_killed_workers_task_runs_again_after_the_lease_until_the_limit(
    url: str, tmp_path: Path, workers: list[CliWorker]
) -> None:
    record = tmp_path / "record"
    options = {"lease": 2}
    app = crash_app.make_app(url, "crash", options)
    # Given supervised workers (a dead child is replaced) with a 2 s lease and a limit of 3
    parent = start_worker(
        workers,
        tmp_path,
        "tests.crash_app",
        "--processes",
        "2",
        "-c",
        "1",
        "--prefetch",
        "1",
        MQTASKS_BROKER_URL=url,
        MQTASKS_DELIVERY_LIMIT="3",
        CRASH_TEST_QUEUE="crash",
        CRASH_TEST_RECORD=str(record),
        CRASH_TEST_TRANSPORT_OPTIONS=json.dumps(options),
    )
    parent.wait_started(2)
    # When a task SIGKILLs its worker process mid-task, every time it runs
    app.tasks[crash_app.KILL].delay("doom")
    parent.wait_log("task.dead_lettered", timeout=60)
    # Then nothing was lost: it ran again once each lease ended, three times in all,
    # and the fourth delivery, over the limit, was dead-lettered instead of run
    starts = [pid for event, tag, pid in crash_app.read_record(record) if event == "start"]
    assert len(starts) == 3 and len(set(starts)) == 3
    [entry] = app.dead_letters("crash")
    assert (entry.reason, entry.task) == ("delivery_limit", crash_app.KILL)
    # and the workers go on with other work
    app.tasks[crash_app.PING].delay("after")
    wait_for(lambda: any(e == "ping" for e, _, _ in crash_app.read_record(record)), "the ping", 30)
    parent.signal(signal.SIGTERM)
    assert parent.wait(30) == 0, parent.stderr()[-3000:]


def test_two_worker_processes_on_one_file_never_run_a_task_twice(
    url: str, tmp_path: Path, workers: list[CliWorker]
) -> None:
    record = tmp_path / "record"
    env = {"MQTASKS_BROKER_URL": url, "SQLITE_TEST_RECORD": str(record)}
    app_path = "tests.transport.test_sqlite_broker:worker_app"
    # Given two worker processes of four threads each on the same file
    pair = [start_worker(workers, tmp_path, app_path, "-c", "4", **env) for _ in range(2)]
    for worker in pair:
        worker.wait_started()
    # When 300 tasks are published to it from a third process
    app = make_worker_app(url)
    work = app.tasks["sqlite.work"]
    tags = [f"t{n}" for n in range(300)]
    work.map(tags[:150])  # one transaction
    for tag in tags[150:]:
        work.delay(tag)
    wait_for(lambda: _count(record, "end") >= 300, "300 tasks to end", 60)
    time.sleep(0.5)  # room for a duplicate to show up
    # Then each ran exactly once, in one process, start before end; both processes worked
    lines = [line.split() for line in record.read_text().splitlines()]
    starts = sorted(tag for event, tag, _, _ in lines if event == "start")
    assert starts == sorted(tags)
    by_tag: dict[str, list[tuple[str, str, int]]] = {}
    for event, tag, pid, at in lines:
        by_tag.setdefault(tag, []).append((event, pid, int(at)))
    for tag, events in by_tag.items():
        (e1, p1, t1), (e2, p2, t2) = sorted(events, key=lambda e: e[2])
        assert (e1, e2) == ("start", "end") and p1 == p2 and t1 <= t2, tag
    assert len({pid for _, _, pid, _ in lines}) == 2
    assert app.transport.queue_stats([app.queue(work.queue)])[work.queue].unacked == 0
    for worker in pair:
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.stderr()[-3000:]


def receive(consumer: Consumer, got: list[Delivery]) -> Delivery:
    """Drain ``consumer`` (started with ``got.append``) until a delivery arrives; return it."""

    def arrived() -> list[Delivery]:
        consumer.drain(0.05)
        return got

    wait_for(arrived, "a delivery", 5)
    return got.pop()


def _count(record: Path, event: str) -> int:
    if not record.exists():
        return 0
    return sum(1 for line in record.read_text().splitlines() if line.startswith(event + " "))


# -- in process --------------------------------------------------------------------


def test_a_delayed_task_is_held_by_run_at(url: str) -> None:
    app = App("t", broker=url, default_queue="delays")
    ran: list[float] = []

    @app.task
    def later() -> None:
        ran.append(time.time())

    spec = app.queue(later.queue)
    with running_worker(app, concurrency=1) as worker:
        sent = time.time()
        later.apply_async(countdown=1.0)
        # Held: not ready, counted as delayed, not run
        assert app.transport.message_counts([spec]) == {"delays": 0}
        assert app.transport.delayed_counts([spec]) == {"delays": 1}
        wait_for(lambda: ran, "the delayed task to run", 10)
        drain(worker)
    assert ran[0] >= sent + 1.0
    assert app.transport.delayed_counts([spec]) == {"delays": 0}


def test_a_message_past_its_delivery_limit_is_dead_lettered_with_its_reason(url: str) -> None:
    app = App("t", broker=url, queues=[QueueSpec("limited", delivery_limit=2)])
    ran: list[int] = []

    @app.task(queue="limited")
    def once() -> None:
        ran.append(1)

    handle = once.delay()
    spec = app.queue("limited")
    # Given two deliveries that ended without a settlement (their consumer went away)
    for n in (1, 2):
        got: list[Delivery] = []
        consumer = app.transport.consumer([spec], prefetch=1)
        consumer.start(got.append)
        delivery = receive(consumer, got)
        assert delivery.delivery_count == n and delivery.redelivered is (n > 1)
        consumer.close()
    # When a worker receives it a third time, over the limit
    with running_worker(app, concurrency=1) as worker:
        drain(worker, raise_errors=False)
    # Then it is dead-lettered with its reason, not run
    assert ran == []
    [entry] = app.dead_letters("limited")
    assert (entry.id, entry.reason) == (handle.id, "delivery_limit")


def test_a_task_longer_than_the_lease_is_not_handed_out_again(url: str) -> None:
    """The worker renews the lease while the task runs: no other consumer gets it."""
    app = App("t", broker=url + "?lease=1", default_queue="long")
    runs: list[int] = []

    @app.task
    def long() -> None:
        runs.append(1)
        time.sleep(3.5)  # three and a half leases

    long.delay()
    # Given two workers on the file, both with room for more
    with running_worker(app, concurrency=2) as first, running_worker(app, concurrency=2):
        wait_for(lambda: runs, "the task to start", 10)
        drain(first, timeout=20)
    # Then it ran once, and its row is gone
    assert runs == [1]
    assert app.transport.queue_stats([app.queue("long")])["long"].unacked == 0


def test_a_requeue_does_not_count_a_delivery(url: str) -> None:
    transport = resolve(url)
    app = App("t", broker=url, default_queue="requeued")

    @app.task
    def noop() -> None: ...

    noop.delay()
    got: list[Delivery] = []
    consumer = transport.consumer([app.queue("requeued")], prefetch=1)
    consumer.start(got.append)
    try:
        for _ in range(2):
            delivery = receive(consumer, got)
            assert delivery.delivery_count == 1
            assert consumer.requeue(delivery)
    finally:
        consumer.close()


def test_dead_letters_are_listed_replayed_and_purged_by_mqtasks_dlq(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import dlq_app

    app = dlq_app.create(url, "dlq-work")
    for n in range(3):
        app.tasks[dlq_app.FLAKY].delay(n)
    with running_worker(app, concurrency=1) as worker:
        drain(worker, raise_errors=False)
    monkeypatch.setenv("MQTASKS_BROKER_URL", url)
    monkeypatch.setenv("DLQ_TEST_QUEUE", "dlq-work")

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    listed = invoke("dlq", "ls", "-A", "tests.dlq_app:create()", "--json")
    rows = [json.loads(line) for line in listed.splitlines()]
    assert len(rows) == 3 and {r["task"] for r in rows} == {dlq_app.FLAKY}
    assert "Replayed 1 dead letter." in invoke(
        "dlq", "replay", "-A", "tests.dlq_app:create()", "--id", rows[0]["id"]
    )
    assert app.transport.message_counts([app.queue("dlq-work")]) == {"dlq-work": 1}
    assert "Purged 2 dead letters" in invoke(
        "dlq", "purge", "-A", "tests.dlq_app:create()", "dlq-work", "--yes"
    )
    assert app.dead_letters("dlq-work") == []


def test_queue_stats_count_ready_held_delayed_and_dead_messages(url: str) -> None:
    app = App("t", broker=url, default_queue="stats")

    @app.task(max_retries=0)
    def fail() -> None:
        raise RuntimeError("no")

    fail.delay()
    with running_worker(app, concurrency=1) as worker:
        drain(worker, raise_errors=False)
    fail.delay()
    fail.delay()
    fail.apply_async(countdown=60)
    spec = app.queue("stats")
    consumer = app.transport.consumer([spec], prefetch=1)
    got: list[Delivery] = []
    consumer.start(got.append)
    try:
        receive(consumer, got)
        stats = app.transport.queue_stats([spec])["stats"]
        assert (stats.ready, stats.unacked, stats.delayed, stats.dead_lettered) == (1, 1, 1, 1)
        assert stats.head_published_at is not None and stats.consumers == 1
    finally:
        consumer.close()
    assert app.transport.queue_stats([spec])["stats"].consumers == 0
    assert app.transport.purge([spec]) == 3  # ready and delayed, the returned one too
    app.transport.delete([spec, app.queue("stats.dlq")])
    assert app.transport.queue_stats([spec])["stats"].dead_lettered == 0


def test_a_relative_and_an_absolute_path_both_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for url, path in [
        ("sqlite:///relative.db", tmp_path / "relative.db"),
        (f"sqlite:///{tmp_path}/absolute.db", tmp_path / "absolute.db"),
    ]:
        app = App("t", broker=url, default_queue="paths")
        ran: list[str] = []
        hello = app.task(name="hello")(ran.append)
        hello.delay(url)
        assert path.exists() and isinstance(app.transport, SqliteTransport)
        assert app.transport.path == path
        with running_worker(app, concurrency=1) as worker:
            drain(worker)
        assert ran == [url]


def test_a_file_that_cannot_be_used_gives_a_clear_error(tmp_path: Path) -> None:
    missing = App("t", broker=f"sqlite:///{tmp_path}/no/such/dir/tasks.db")

    @missing.task
    def noop() -> None: ...

    with pytest.raises(ConfigurationError, match="does not exist; create it"):
        noop.delay()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ConnectionFailed, match=r"garbage\.db"):
        SqliteTransport(f"sqlite:///{garbage}").connect()
    with pytest.raises(ConfigurationError, match="is a directory"):
        SqliteTransport(f"sqlite:///{tmp_path}").connect()
    if Path("/proc/self").is_dir():  # a directory nobody can create files in, root included
        with pytest.raises(ConfigurationError, match=r"cannot create or open .* writable"):
            SqliteTransport("sqlite:////proc/mqtasks-test.db").connect()
    with pytest.raises(ConfigurationError, match="in-memory"):
        resolve("sqlite://")
    with pytest.raises(ConfigurationError, match="Unknown transport option"):
        resolve(f"sqlite:///{tmp_path}/x.db?leas=3")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the permissions say")
def test_a_read_only_directory_gives_a_clear_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigurationError, match="not writable"):
            SqliteTransport(f"sqlite:///{locked}/tasks.db").connect()
    finally:
        locked.chmod(0o700)


def test_what_sqlite_cannot_do_is_refused_with_what_to_do_instead(url: str) -> None:
    app = App("t", broker=url)
    transport = app.transport
    assert not transport.capabilities.exchanges
    with pytest.raises(ConfigurationError, match="cannot route events"):
        app.emit("order.created", {"id": 1})
    with pytest.raises(ConfigurationError, match="cannot drop a queue"):
        transport.declare([QueueSpec("bcast", durable=False)])
    with pytest.raises(ConfigurationError, match="max_length and message_ttl"):
        transport.declare([QueueSpec("bounded", max_length=10)])


def test_the_database_is_in_wal_mode_and_claims_are_leased(url: str) -> None:
    app = App("t", broker=url, default_queue="leases")

    @app.task
    def noop() -> None: ...

    noop.delay()
    transport = app.transport
    assert isinstance(transport, SqliteTransport)
    conn = sqlite3.connect(transport.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        got: list[Delivery] = []
        consumer = transport.consumer([app.queue("leases")], prefetch=1)
        consumer.start(got.append)
        try:
            receive(consumer, got)
            [(until, by)] = conn.execute(
                "SELECT locked_until, locked_by FROM mqtasks_messages WHERE queue = 'leases'"
            ).fetchall()
            assert until > time.time() + transport.lease / 2 and by
        finally:
            consumer.close()
        [(until, returns)] = conn.execute(
            "SELECT locked_until, returns FROM mqtasks_messages WHERE queue = 'leases'"
        ).fetchall()
        assert (until, returns) == (None, 1)  # held at close: back, counted
    finally:
        conn.close()


def test_ordered_tasks_keep_their_order_per_key_across_two_workers(url: str) -> None:
    """Partition queues come and go on a consumer (add_queue); the order per key holds."""
    app = App(
        "t",
        broker=url + "?lease=2",
        backend="memory://",  # the partition leases; both workers are in this process
        default_queue="ordered",
        ordering_lease_ttl=3,
        ordering_gap_timeout=0.5,
    )
    seen: dict[int, list[int]] = {}

    @app.task(ordering_key="account", partitions=4)
    def post(account: int, n: int) -> None:
        seen.setdefault(account, []).append(n)
        time.sleep(0.001)

    for n in range(30):
        for account in range(5):
            post.delay(account, n)
    with running_worker(app, concurrency=4), running_worker(app, concurrency=4):
        wait_for(lambda: sum(map(len, seen.values())) >= 150, "150 ordered tasks", 60)
    assert seen == {account: list(range(30)) for account in range(5)}
