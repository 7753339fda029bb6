"""Poison input, injected bypassing mqtasks' producer: every kind ends in the
dead-letter queue with its reason, is never executed or deserialised, and the
worker keeps going (memory, the local RabbitMQ, the local Redis).
"""

from __future__ import annotations

import collections
import json
import pickle
import re
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kombu.message
import pytest
import redis

from mqtasks import App, DecodeError, EncodeError
from mqtasks.serialization import MAX_JSON_DEPTH, decode_body, json_depth_exceeds
from mqtasks.testing import drain, running_worker
from mqtasks.transport.kombu import KombuTransport
from mqtasks.transport.redis import RedisTransport
from tests._helpers.brokers import AMQP_URL, require_broker
from tests._helpers.wait import wait_for

JSON = {"content_type": "application/json", "content_encoding": "utf-8"}
GOOD_BODY = b'{"args":[1,2],"kwargs":{}}'
MiB = 1024 * 1024


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"x": 1}
    for _ in range(depth):
        value = {"k": value}
    return value


def inject(app: App, queue: str, body: bytes, message_id: str, **props: Any) -> None:
    """Publish raw bytes with raw properties, as a hostile or buggy producer would."""
    headers = dict(props.pop("headers", {}))
    transport = app.transport
    if isinstance(transport, RedisTransport):
        meta = {
            "i": message_id,
            "h": headers,
            "t": props.get("content_type"),
            "e": props.get("content_encoding"),
            "p": None,
        }
        head = json.dumps(meta, separators=(",", ":")).encode()
        client = redis.Redis.from_url(transport.redis_url)
        try:
            client.lpush(transport.queue_key(queue), b"n" + head + b"\n" + body)
        finally:
            client.close()
        return
    assert isinstance(transport, KombuTransport), transport
    with transport.connection() as conn:
        conn.Producer().publish(
            body, routing_key=queue, exchange="", headers=headers, message_id=message_id, **props
        )


def inject_deep_headers(app: App, queue: str, task: str, depth: int) -> None:
    """A header nested ``depth`` levels: tables on RabbitMQ (from another process,
    whose recursion limit is raised to write it), JSON on Redis, dicts in memory."""
    transport = app.transport
    if isinstance(transport, RedisTransport):
        deep = '{"k":' * depth + "1" + "}" * depth
        head = (
            f'{{"i":"deep-headers","h":{{"mqtasks-task":"{task}","deep":{deep}}},'
            '"t":"application/json","e":"utf-8","p":null}'
        )
        client = redis.Redis.from_url(transport.redis_url)
        try:
            client.lpush(transport.queue_key(queue), b"n" + head.encode() + b"\n" + GOOD_BODY)
        finally:
            client.close()
        return
    if app.settings.broker_url.startswith("memory"):
        headers = {"mqtasks-task": task, "deep": _nested(depth)}
        inject(app, queue, GOOD_BODY, "deep-headers", headers=headers, **JSON)
        return
    script = textwrap.dedent(
        f"""
        import sys, kombu
        sys.setrecursionlimit(100_000)
        deep = {{"x": 1}}
        for _ in range({depth}):
            deep = {{"k": deep}}
        with kombu.Connection({AMQP_URL!r}) as conn:
            conn.Producer().publish(
                {GOOD_BODY!r}, routing_key={queue!r}, exchange="", message_id="deep-headers",
                headers={{"mqtasks-task": {task!r}, "deep": deep}},
                content_type="application/json", content_encoding="utf-8",
            )
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


class Pwn:
    """A pickle that would create a file if anyone unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_every_poison_kind_is_dead_lettered_with_its_reason(app: App, tmp_path: Path) -> None:
    good: list[int] = []

    @app.task(max_retries=0)
    def add(x: int, y: int) -> None:
        good.append(x + y)

    queue = add.queue
    app.declare([queue])
    marker = tmp_path / "pwned"
    task = {"mqtasks-task": add.name}
    limit = app.settings.max_message_size
    poison: list[tuple[str, bytes, dict[str, Any], str]] = [
        # (id, body, properties, expected reason)
        ("a-malformed", b'{"args": [1, 2', {"headers": task, **JSON}, "decode_error"),
        ("b-unknown", GOOD_BODY, {"headers": {"mqtasks-task": "os.system"}, **JSON}, "unknown_task"),
        ("c-missing-arg", b'{"args":[1],"kwargs":{}}', {"headers": task, **JSON}, "invalid_arguments"),
        ("c-extra-kwarg", b'{"args":[1,2],"kwargs":{"z":3}}', {"headers": task, **JSON}, "invalid_arguments"),
        ("d-one-byte-over", b" " * (limit + 1), {"headers": task, **JSON}, "too_large"),
        ("e-text", b"1 + 2", {"headers": task, "content_type": "text/plain"}, "content_type"),
        ("e-yaml", b"args: [1, 2]", {"headers": task, "content_type": "application/x-yaml"}, "content_type"),
        ("e-msgpack", b"\x82\xa4args\x92\x01\x02", {"headers": task, "content_type": "application/x-msgpack"}, "content_type"),
        ("e-none", GOOD_BODY, {"headers": task, "content_type": "application/data"}, "content_type"),
        ("f-pickle", pickle.dumps(Pwn(str(marker))), {"headers": task, "content_type": "application/x-python-serialize", "content_encoding": "binary"}, "content_type"),
        ("g-compressed", zlib.compress(GOOD_BODY), {"headers": {**task, "compression": "application/x-gzip"}, **JSON}, "compression_refused"),
        ("h-attempt-negative", GOOD_BODY, {"headers": {**task, "mqtasks-attempt": -1}, **JSON}, "invalid_headers"),
        ("h-attempt-text", GOOD_BODY, {"headers": {**task, "mqtasks-attempt": "abc"}, **JSON}, "invalid_headers"),
        ("h-attempt-huge", GOOD_BODY, {"headers": {**task, "mqtasks-attempt": 10**9}, **JSON}, "invalid_headers"),
        ("h-task-type", GOOD_BODY, {"headers": {"mqtasks-task": 42}, **JSON}, "invalid_headers"),
        ("h-eta-9999", GOOD_BODY, {"headers": {**task, "mqtasks-expires": 253402300799.0}, **JSON}, "invalid_headers"),
        ("h-long-value", GOOD_BODY, {"headers": {**task, "note": "x" * 65536}, **JSON}, "invalid_headers"),
        ("h-many", GOOD_BODY, {"headers": {**task, **{f"h{i}": i for i in range(100)}}, **JSON}, "invalid_headers"),
        ("h-forged-x-death", GOOD_BODY, {"headers": {**task, "x-death": "yes, twice"}, **JSON}, "invalid_headers"),
        ("h-class-name", GOOD_BODY, {"headers": {"mqtasks-task": "subprocess.Popen"}, **JSON}, "unknown_task"),
        ("i-deep-json", b'{"args":[' + b"[" * 100_000 + b"]" * 100_000 + b'],"kwargs":{}}', {"headers": task, **JSON}, "decode_error"),
        ("i-huge-int", b'{"args":[' + b"9" * 1_000_000 + b',1],"kwargs":{}}', {"headers": task, **JSON}, "decode_error"),
    ]  # fmt: skip
    # Given every kind of poison, with good tasks between them
    for n, (message_id, body, props, _) in enumerate(poison):
        inject(app, queue, body, message_id, **props)
        if n % 5 == 0:
            add.delay(n, 1)
    inject_deep_headers(app, queue, add.name, 3000)
    add.delay(100, 1)
    # When one worker consumes them all
    with running_worker(app, concurrency=1) as worker:
        drain(worker, timeout=60, raise_errors=False)
        alive = worker._io_thread is not None and worker._io_thread.is_alive()
    # Then the good tasks ran, the worker never crashed, nothing was unpickled
    assert sorted(good) == sorted([n + 1 for n in range(0, len(poison), 5)] + [101])
    assert alive
    assert not marker.exists()
    # And each poison message is in the dead-letter queue once, with its reason
    entries = app.dead_letters(queue, limit=200)
    # On Redis the id is inside the metadata too deep to read: the entry gets a new one.
    ids = {e.id: e.id if not e.id.startswith("no-id-") else "deep-headers" for e in entries}
    found = {ids[e.id]: e.reason for e in entries}
    expected = {message_id: reason for message_id, _, _, reason in poison}
    expected["deep-headers"] = "invalid_headers"
    assert found == expected
    assert collections.Counter(ids[e.id] for e in entries) == collections.Counter(list(expected))
    assert app.transport.message_counts([app.queue(queue)])[queue] == 0


def _peak_rss_kib() -> int:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert match is not None
    return int(match.group(1))


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


@pytest.fixture(scope="module")
def zlib_bomb() -> bytes:
    """About 1 MiB of zlib data that inflates to 1 GiB of zeros."""
    packer = zlib.compressobj(9)
    chunk = bytes(MiB)
    parts = [packer.compress(chunk) for _ in range(1024)]
    parts.append(packer.flush())
    return b"".join(parts)


@pytest.fixture
def decompressions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records each call of kombu's decompression (and lets it run)."""
    calls: list[str] = []
    real = kombu.message.decompress

    def recording(body: bytes, content_type: str) -> bytes:
        calls.append(content_type)
        inflated: bytes = real(body, content_type)
        return inflated

    monkeypatch.setattr(kombu.message, "decompress", recording)
    yield calls


def test_a_zlib_bomb_is_refused_without_being_inflated(
    broker_url: str,
    make_app: Callable[..., App],
    zlib_bomb: bytes,
    decompressions: list[str],
) -> None:
    # The size limit is raised above the bomb's size, so only the compression guard stands.
    app = make_app(broker_url, max_message_size=4 * MiB)
    ran: list[int] = []

    @app.task(max_retries=0)
    def add(x: int, y: int) -> None:
        ran.append(x + y)

    app.declare([add.queue])
    assert len(zlib_bomb) < 2 * MiB and zlib.decompressobj().decompress(zlib_bomb[:4096])
    headers = {"mqtasks-task": add.name, "compression": "application/x-gzip"}
    with running_worker(app, concurrency=1) as worker:
        add.delay(1, 1)
        drain(worker, timeout=30)
        # Given a worker at its resting memory
        _reset_peak_rss()
        baseline = _peak_rss_kib()
        # When a 1 GiB zlib bomb arrives, then a good task
        inject(app, add.queue, zlib_bomb, "bomb", headers=headers, **JSON)
        add.delay(2, 2)
        drain(worker, timeout=60, raise_errors=False)
        peak = _peak_rss_kib()
    # Then it is dead-lettered, never inflated, and the worker's memory stayed flat
    assert ran == [2, 4]
    assert [(e.id, e.reason) for e in app.dead_letters(add.queue)] == [
        ("bomb", "compression_refused")
    ]
    assert decompressions == []
    assert (peak - baseline) * 1024 < 64 * MiB, f"peak RSS grew by {(peak - baseline) // 1024} MiB"


def test_delay_refuses_what_a_worker_would_refuse(make_app: Callable[..., App]) -> None:
    app = make_app()

    @app.task
    def store(data: Any) -> None: ...

    deep: list[Any] = []
    for _ in range(MAX_JSON_DEPTH):
        deep = [deep]
    with pytest.raises(EncodeError, match="max_message_size"):
        store.delay("x" * (app.settings.max_message_size + 1))
    with pytest.raises(EncodeError, match="nested more than"):
        store.delay(deep)
    assert app.transport.message_counts([app.queue(store.queue)])[store.queue] == 0


@pytest.mark.parametrize(
    ("data", "limit", "deeper"),
    [
        (b"[]", 1, False),
        (b"[[]]", 1, True),
        (b'{"a": "[[[[[[[[", "b": [1]}', 2, False),  # brackets in strings are text
        (b'["\\"[[[[", [[1]]]', 3, False),  # an escaped quote does not end the string
        (b'["\\\\", [[[1]]]]', 3, True),  # an escaped backslash does
        (b"[" * 65 + b"]" * 65, 64, True),
        (b"[" * 64 + b"]" * 64, 64, False),
    ],
)
def test_json_depth_scanner(data: bytes, limit: int, deeper: bool) -> None:
    assert json_depth_exceeds(data, limit) is deeper
    if not deeper:
        json.loads(data)  # the cases are valid JSON


def test_json_bombs_are_refused_whatever_the_interpreter_limits() -> None:
    # A program may raise the recursion limit and lift Python's integer digit
    # limit; the decoder must still refuse deep nesting (without overflowing the
    # C stack, which would kill the process) and huge integers.
    script = textwrap.dedent(
        """
        import sys
        sys.setrecursionlimit(1_000_000)
        sys.set_int_max_str_digits(0)
        from mqtasks import DecodeError
        from mqtasks.serialization import decode_body
        for body in (
            b'{"args":[' + b"[" * 500_000 + b"]" * 500_000 + b'],"kwargs":{}}',
            b'{"args":[' + b"7" * 200_000 + b'],"kwargs":{}}',
        ):
            try:
                decode_body(body, content_type="application/json",
                            content_encoding="utf-8", max_size=10**7)
            except DecodeError as exc:
                print(exc.reason)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["decode_error", "decode_error"]


def test_json_constants_and_long_integers_are_not_json() -> None:
    for body in (b'{"args":[NaN],"kwargs":{}}', b'{"args":[' + b"1" * 1001 + b'],"kwargs":{}}'):
        with pytest.raises(DecodeError) as info:
            decode_body(
                body, content_type="application/json", content_encoding="utf-8", max_size=MiB
            )
        assert info.value.reason == "decode_error"
    args, _ = decode_body(
        b'{"args":[' + b"1" * 1000 + b'],"kwargs":{}}',
        content_type="application/json",
        content_encoding="utf-8",
        max_size=MiB,
    )
    assert args == [int("1" * 1000)]


def test_json_depth_scanner_reads_long_strings_of_escapes() -> None:
    # A 1 MiB string of escapes before deep nesting: the string is skipped whole.
    body = b'["' + b"\\\\" * (MiB // 4) + b'",' + b"[" * 1000 + b"]" * 1000 + b"]"
    assert json_depth_exceeds(body, 64)
    assert not json_depth_exceeds(body, 1001)


def test_a_dead_letter_entry_keeps_its_headers_within_a_bound() -> None:
    # A refused message's headers are as large as the broker carried them; its
    # dead-letter entry adds the reason on top and must still be publishable
    # (RabbitMQ carries all headers in one frame, 128 KiB by default).
    from mqtasks.deadletter import dead_letter_envelope
    from mqtasks.transport.redis import RedisDelivery

    headers = {"mqtasks-task": "t", "note": "x" * 200_000, "small": 1, "traceparent": "00-ab"}
    meta = {"i": "big", "h": headers, "t": "application/json", "e": "utf-8", "p": None}
    element = b"n" + json.dumps(meta).encode() + b"\n" + GOOD_BODY
    delivery = RedisDelivery(element, "q", 1, "", "")
    envelope = dead_letter_envelope(
        delivery,
        None,
        reason="invalid_headers",
        detail="header 'note' is too long",
        exc=RuntimeError("y" * 100_000),
        worker="1@host",
    )
    kept = dict(envelope.headers)
    assert len(json.dumps(kept)) < 80 * 1024
    assert kept["mqtasks-death-reason"] == "invalid_headers"
    assert (kept["mqtasks-task"], kept["small"], kept["traceparent"]) == ("t", 1, "00-ab")
    assert "note" not in kept
    assert kept["mqtasks-death-dropped-headers"] == "note"
    assert envelope.body == GOOD_BODY and envelope.message_id == "big"


def _largest_header_value(app: App, headers: dict[str, Any], key: str) -> int:
    """The longest value of header ``key`` RabbitMQ takes with ``headers`` (bisection;
    a frame too large closes the connection, so each probe has its own)."""
    transport = app.transport
    assert isinstance(transport, KombuTransport), transport
    low, high = 0, 1 * MiB
    while high - low > 1:
        size = (low + high) // 2
        try:
            with transport.connection() as conn:
                conn.Producer().publish(
                    GOOD_BODY,
                    routing_key="mqt-nowhere",
                    exchange="",
                    headers={**headers, key: "x" * size},
                    message_id="big-headers",
                    retry=False,
                    **JSON,
                )
        except Exception:
            high = size
        else:
            low = size
    return low


def test_headers_as_large_as_rabbitmq_takes_end_in_the_dead_letter_queue(
    amqp_url: str, make_app: Callable[..., App]
) -> None:
    app = make_app(amqp_url)
    ran: list[int] = []

    @app.task(max_retries=0)
    def add(x: int, y: int) -> None:
        ran.append(x + y)

    app.declare([add.queue])
    headers = {"mqtasks-task": add.name}
    size = _largest_header_value(app, headers, "note")
    assert 100_000 < size < 131_072
    # Given a message whose headers fill RabbitMQ's frame, then a good task
    inject(
        app, add.queue, GOOD_BODY, "big-headers", headers={**headers, "note": "x" * size}, **JSON
    )
    add.delay(1, 1)
    # When a worker consumes them
    with running_worker(app, concurrency=1) as worker:
        drain(worker, timeout=20, raise_errors=False)
    # Then the message is dead-lettered once with its reason (not requeued in a loop)
    assert ran == [2]
    assert [(e.id, e.reason) for e in app.dead_letters(add.queue)] == [
        ("big-headers", "invalid_headers")
    ]


@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_a_worker_holds_no_message_once_it_is_settled(
    kind: str, make_app: Callable[..., App]
) -> None:
    # A worker thread waiting for its next message must not keep the last one
    # (a 20 MiB poison body, the element it came in) alive until then.
    import tracemalloc

    app = make_app(require_broker(kind))

    @app.task(max_retries=0)
    def add(x: int, y: int) -> None: ...

    app.declare([add.queue])
    tracemalloc.start()
    try:
        body = b'{"args":[1,2],"kwargs":{"pad":"' + b"x" * (8 * MiB) + b'"}}'
        inject(app, add.queue, body, "too-large", headers={"mqtasks-task": add.name}, **JSON)
        del body
        before, _ = tracemalloc.get_traced_memory()

        def held() -> int:
            return tracemalloc.get_traced_memory()[0] - before

        with running_worker(app, concurrency=1) as worker:
            drain(worker, timeout=30, raise_errors=False)
            # The I/O thread sends the settlement with its next fetch, then lets go.
            wait_for(
                lambda: held() < 4 * MiB,
                lambda: f"the message to be let go ({held() / MiB:.1f} MiB still held)",
                timeout=10,
            )
    finally:
        tracemalloc.stop()
    assert [(e.id, e.reason) for e in app.dead_letters(add.queue)] == [("too-large", "too_large")]
