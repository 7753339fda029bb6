"""The wire protocol: encoding, and every check a received message must pass."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from mqtasks import DecodeError, Message
from mqtasks.serialization import decode_body, encode_body
from mqtasks.transport.kombu_consumer import KombuDelivery as Delivery

LIMIT = 1024 * 1024


def delivery(
    body: bytes | None = None,
    *,
    headers: dict[str, Any] | None = None,
    content_type: str | None = "application/json",
    message_id: str | None = "id-1",
    refused: str | None = None,
) -> Delivery:
    """A delivery as the consumer builds it from a received kombu message."""
    raw = SimpleNamespace(
        body=b'{"args":[1,2],"kwargs":{"z":3}}' if body is None else body,
        headers={"mqtasks-task": "t.add", "mqtasks-attempt": 1} if headers is None else headers,
        properties={"message_id": message_id, "priority": 4},
        content_type=content_type,
        content_encoding="utf-8",
        delivery_info={"redelivered": True},
        mqtasks_refused=refused,
    )
    return Delivery(raw, "work", 1)  # type: ignore[arg-type]


def test_round_trip_through_the_envelope() -> None:
    published = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    message = Message(
        id="id-9",
        task="t.add",
        queue="work",
        args=(1, "two"),
        kwargs={"k": [1, {"a": None}]},
        attempt=3,
        published_at=published,
        expires_at=published.replace(year=2027),
        priority=2,
        headers={"traceparent": "00-abc-def-01"},
    )
    env = message.to_envelope(encode_body(message.args, dict(message.kwargs), max_size=LIMIT))
    assert env.headers["mqtasks-protocol"] == 1
    assert env.headers["mqtasks-task"] == "t.add"
    assert env.headers["mqtasks-attempt"] == 3
    assert env.headers["mqtasks-published-at"] == published.timestamp()
    assert env.headers["traceparent"] == "00-abc-def-01"
    assert "@" in env.headers["mqtasks-origin"]
    assert json.loads(env.body) == {"args": [1, "two"], "kwargs": {"k": [1, {"a": None}]}}
    raw = SimpleNamespace(
        body=env.body,
        headers=dict(env.headers),
        properties={"message_id": env.message_id, "priority": env.priority},
        content_type=env.content_type,
        content_encoding=env.content_encoding,
        delivery_info={},
    )
    back = Message.from_delivery(Delivery(raw, "work", 1), max_size=LIMIT)  # type: ignore[arg-type]
    assert back.copy(origin=None) == message.copy(origin=None)


def test_decoded_delivery_fields() -> None:
    m = Message.from_delivery(delivery(), max_size=LIMIT)
    assert (m.id, m.task, m.queue, m.args, dict(m.kwargs)) == (
        "id-1",
        "t.add",
        "work",
        (1, 2),
        {"z": 3},
    )
    assert m.attempt == 1 and m.priority == 4 and m.redelivered


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"refused": "compression_refused"}, "compression_refused"),
        ({"body": b"x" * (LIMIT + 1)}, "too_large"),
        ({"content_type": "application/x-python-serialize"}, "content_type"),
        ({"content_type": "application/x-yaml"}, "content_type"),
        ({"content_type": "text/plain"}, "content_type"),
        ({"content_type": None}, "content_type"),
        ({"body": b"{not json"}, "decode_error"),
        ({"body": b"\xff\xfe"}, "decode_error"),
        ({"body": b"[1, 2]"}, "decode_error"),
        ({"body": b'{"args": {}, "kwargs": {}}'}, "decode_error"),
        ({"body": b"[" * 100_000 + b"]" * 100_000}, "decode_error"),
        ({"body": b'{"args": [' + b"9" * 1_000_000 + b'], "kwargs": {}}'}, "decode_error"),
        ({"message_id": None}, "invalid_headers"),
        ({"message_id": "x" * 300}, "invalid_headers"),
        ({"headers": {}}, "invalid_headers"),
        ({"headers": {"mqtasks-task": 5}}, "invalid_headers"),
        ({"headers": {"mqtasks-task": "t", "mqtasks-attempt": -1}}, "invalid_headers"),
        ({"headers": {"mqtasks-task": "t", "mqtasks-attempt": "abc"}}, "invalid_headers"),
        ({"headers": {"mqtasks-task": "t", "mqtasks-attempt": 10**9}}, "invalid_headers"),
        ({"headers": {"mqtasks-task": "t", "mqtasks-attempt": True}}, "invalid_headers"),
        ({"headers": {"mqtasks-task": "t", "mqtasks-protocol": 2}}, "invalid_headers"),
        ({"headers": {"mqtasks-task": "t", "mqtasks-expires": 253402300800.0}}, "invalid_headers"),
        ({"headers": {"mqtasks-task": "t", "mqtasks-expires": float("nan")}}, "invalid_headers"),
        ({"headers": {"mqtasks-task": "t", "mqtasks-published-at": "today"}}, "invalid_headers"),
        ({"headers": {"mqtasks-task": "t", "big": "x" * (1024 * 1024)}}, "invalid_headers"),
        ({"headers": {"mqtasks-task": "t", **{f"h{i}": i for i in range(100)}}}, "invalid_headers"),
    ],
)
def test_bad_input_is_refused_with_its_reason(kwargs: dict[str, Any], reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        Message.from_delivery(delivery(**kwargs), max_size=LIMIT)
    assert info.value.reason == reason
    assert len(str(info.value)) < 200  # reasons never echo the body


def test_unknown_headers_pass_through() -> None:
    m = Message.from_delivery(
        delivery(headers={"mqtasks-task": "t", "traceparent": "00-x", "mqtasks-future": 1}),
        max_size=LIMIT,
    )
    assert m.headers == {"traceparent": "00-x"}


def test_decode_body_refuses_other_encodings() -> None:
    with pytest.raises(DecodeError, match="content_type"):
        decode_body(b"{}", content_type="application/json", content_encoding="binary", max_size=10)


def test_expiry() -> None:
    m = Message(id="i", task="t", queue="q", expires_at=datetime(2020, 1, 1, tzinfo=timezone.utc))
    assert m.is_expired()
    assert not m.copy(expires_at=None).is_expired()


def test_copy_changes_only_what_it_is_given() -> None:
    published = datetime(2026, 1, 2, tzinfo=timezone.utc)
    original = Message(
        id="m-1",
        task="t.add",
        queue="work",
        args=(1, 2),
        kwargs={"z": 3},
        published_at=published,
        headers={"traceparent": "x"},
    )
    changed = original.copy(attempt=2, headers={"traceparent": "y"})
    assert changed == Message(
        id="m-1",
        task="t.add",
        queue="work",
        args=(1, 2),
        kwargs={"z": 3},
        attempt=2,
        published_at=published,
        headers={"traceparent": "y"},
    )
    assert type(changed) is Message
    assert original.attempt == 1 and original.headers == {"traceparent": "x"}
    with pytest.raises(AttributeError):
        changed.attempt = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="no field"):
        original.copy(atempt=2)
