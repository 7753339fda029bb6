"""``mqtasks beat`` and ``mqtasks worker --beat`` as processes, on real Redis and RabbitMQ."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis

from mqtasks import App
from tests._helpers.brokers import cleanup, unique_name

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(redis_url: str) -> Iterator[dict[str, str]]:
    name = unique_name("beat")
    values = {
        **os.environ,
        "BEAT_APP_NAME": name,
        "BEAT_QUEUE": name,
        "BEAT_RUNS_KEY": f"{name}-runs",
        "BEAT_BROKER_URL": redis_url,
        "BEAT_BACKEND_URL": redis_url,
        "BEAT_RUNS_URL": redis_url,
        "PYTHONPATH": str(ROOT),
        "MQTASKS_LOG_FORMAT": "json",
    }
    yield values
    client = redis.Redis.from_url(redis_url)
    client.delete(values["BEAT_RUNS_KEY"])
    for key in client.scan_iter(f"*{name}*"):
        client.delete(key)
    app = App(name, broker=values["BEAT_BROKER_URL"], default_queue=name)
    app.task(name="heartbeat")(_nothing)  # so that cleanup() deletes the task's queue
    cleanup(app)
    app.close()


def _nothing() -> None: ...


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mqtasks", *args, "-A", "tests.beat_app:app"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err.decode(errors="replace")


def _runs(env: dict[str, str]) -> list[str]:
    client = redis.Redis.from_url(env["BEAT_RUNS_URL"])
    return [r.decode() for r in client.lrange(env["BEAT_RUNS_KEY"], 0, -1)]


def _seconds(ids: list[str]) -> list[datetime]:
    return sorted(datetime.strptime(i[-20:], "%Y-%m-%dT%H:%M:%SZ") for i in ids)


def _wait_for(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_two_beats_and_a_leader_killed_send_every_tick_once(
    env: dict[str, str], broker: str, amqp_url: str
) -> None:
    if broker == "amqp":
        env["BEAT_BROKER_URL"] = amqp_url
    worker = _start(env, "worker", "-c", "2")
    beats = [_start(env, "beat", "--lease-ttl", "2") for _ in range(2)]
    try:
        _wait_for(lambda: len(_runs(env)) >= 2, 30)
        reader = App(env["BEAT_APP_NAME"], broker="memory://", backend=env["BEAT_BACKEND_URL"])
        holder = reader.backend.lease_holder(f"periodic:{env['BEAT_APP_NAME']}:leader")
        reader.close()
        assert holder is not None
        pid = int(holder[0].split(":")[1])
        [leader] = [b for b in beats if b.pid == pid]
        leader.kill()  # SIGKILL: the lease is left to expire
        leader.wait()
        count = len(_runs(env))
        _wait_for(lambda: len(_runs(env)) >= count + 4, 30)
    finally:
        codes = [_stop(b) for b in beats]
        _stop(worker)
    survivors = [c for b, c in zip(beats, codes, strict=True) if b.returncode != -signal.SIGKILL]
    assert [code for code, _ in survivors] == [0]
    ids = _runs(env)
    assert len(ids) == len(set(ids)), "a tick ran twice"
    seconds = _seconds(ids)
    expected = [seconds[0] + timedelta(seconds=i) for i in range(len(seconds))]
    assert seconds == expected, "a tick is missing (catch_up='all' fills the failover gap)"


def test_worker_beat_runs_the_scheduler_beside_the_worker(env: dict[str, str]) -> None:
    worker = _start(env, "worker", "--beat", "-c", "2")
    try:
        _wait_for(lambda: len(_runs(env)) >= 3, 30)
    finally:
        code, err = _stop(worker)
    assert code == 0, err
    ids = _runs(env)
    assert len(ids) == len(set(ids))
    assert all(i.startswith(f"periodic:{env['BEAT_APP_NAME']}:") for i in ids)


def test_beat_list_prints_schedules_and_the_leader(env: dict[str, str]) -> None:
    beat = _start(env, "beat", "--lease-ttl", "2")
    try:
        _wait_for(lambda: _listed(env) is not None, 30)
        out = _listed(env)
        assert out is not None
        assert env["BEAT_APP_NAME"] in out and "every 1s" in out
    finally:
        assert _stop(beat)[0] == 0
    after = _list(env)
    assert after.returncode == 0, after.stderr
    assert "leader: none" in after.stdout  # the stopped beat gave the lease up


def _list(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqtasks", "beat", "-A", "tests.beat_app:app", "--list"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _listed(env: dict[str, str]) -> str | None:
    out = _list(env)
    assert out.returncode == 0, out.stderr
    leader_line = out.stdout.strip().splitlines()[-1]
    last_sent_known = datetime.now(timezone.utc).strftime("%Y-%m-%d") in out.stdout.split("\n")[1]
    return out.stdout if "leader: none" not in leader_line and last_sent_known else None


def test_beat_without_a_backend_is_a_usage_error(env: dict[str, str]) -> None:
    env["BEAT_BACKEND_URL"] = "none"
    out = subprocess.run(
        [sys.executable, "-m", "mqtasks", "beat", "-A", "tests.beat_app:app"],
        env={k: v for k, v in env.items() if k != "MQTASKS_BACKEND_URL"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "MQTASKS_BACKEND_URL" in out.stderr
