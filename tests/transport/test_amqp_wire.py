"""The frames mqtasks writes itself are the ones py-amqp writes."""

from __future__ import annotations

import random
from typing import Any

import amqp
import pytest
from amqp.exceptions import RecoverableConnectionError
from amqp.method_framing import frame_writer
from amqp.serialization import dumps

from mqtasks.transport.amqp.wire import _PublishFrames, serialize_properties, write_ack
from mqtasks.transport.base import Envelope


@pytest.mark.parametrize(
    ("headers", "priority"),
    [
        ({}, None),
        ({"mqtasks-task": "t", "mqtasks-attempt": 3, "mqtasks-published-at": 1.5}, None),
        ({"traceparent": "00-ab-cd-01", "big": 2**40, "flag": True, "n": None}, 7),
        ({"nested": {"a": [1, "x", {"b": 2.5}]}, "raw": b"\x00\xff", "unicode": "é"}, 0),
        ({"neg": -(2**31), "edge": 2147483647, "f": -0.0, "no": False, "s": ""}, 255),
        ({"raw": b"\x00\xff", "unicode": "é\U0001f600", "t": ("a", 1)}, None),
    ],
)
def test_properties_match_py_amqp(headers: dict[str, Any], priority: int | None) -> None:
    envelope = Envelope(b"{}", "id-1", headers=headers, priority=priority)
    assert serialize_properties(envelope, dict(headers)) == _py_amqp_properties(envelope)


def _py_amqp_properties(envelope: Envelope) -> bytes:
    """The content-header properties py-amqp writes for ``envelope``, persistent."""
    properties: bytes = amqp.Message(
        b"{}",
        priority=envelope.priority,
        content_type=envelope.content_type,
        content_encoding=envelope.content_encoding,
        application_headers=dict(envelope.headers),
        message_id=envelope.message_id,
        delivery_mode=2,
    )._serialize_properties()
    return properties


def _random_value(rng: random.Random) -> Any:
    kind = rng.randrange(8)
    if kind == 0:
        return "".join(
            chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FFFF)]))
            for _ in range(rng.randrange(40))
        )
    if kind == 1:
        return rng.choice([0, 1, -1, 2**31 - 1, -(2**31) + 1, -(2**31), 2**31, 2**63 - 1, -(2**63)])
    if kind == 2:
        return rng.randrange(-(2**62), 2**62)
    if kind == 3:
        return rng.uniform(-1e9, 1e9)
    if kind == 4:
        return rng.random() < 0.5
    if kind == 5:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(20)))
    if kind == 6:
        return None
    return [rng.randrange(10), "x"]  # not plain: py-amqp's own serializer writes it


def test_properties_of_random_headers_match_py_amqp() -> None:
    rng = random.Random(20261130)
    for _ in range(500):
        headers = {
            "".join(rng.choice("abcé-_.") for _ in range(rng.randrange(1, 30))): _random_value(rng)
            for _ in range(rng.randrange(12))
        }
        priority = rng.choice([None, 0, 9, 255])
        envelope = Envelope(b"{}", f"id-{rng.random()}", headers=headers, priority=priority)
        assert serialize_properties(envelope, dict(headers)) == _py_amqp_properties(envelope)


def test_properties_of_an_envelope_without_encoding_match_py_amqp() -> None:
    envelope = Envelope(b"{}", "id-2", headers={"a": 1}, content_encoding=None)  # type: ignore[arg-type]
    expected = amqp.Message(
        b"{}",
        content_type=envelope.content_type,
        application_headers={"a": 1},
        message_id="id-2",
        delivery_mode=2,
    )._serialize_properties()
    assert serialize_properties(envelope, {"a": 1}) == expected


class _Sink:
    frame_max = 131072
    bytes_sent = 0

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.transport = self

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))


class _Channel:
    channel_id = 7

    def __init__(self, connection: _Sink) -> None:
        self.connection = connection


@pytest.mark.parametrize(("tag", "multiple"), [(1, False), (2**40 + 5, True)])
def test_ack_frame_matches_py_amqp(tag: int, multiple: bool) -> None:
    reference = _Sink()
    frame_writer(reference, reference)(1, 7, (60, 80), dumps("Lb", (tag, multiple)), None)
    ours = _Sink()
    write_ack(_Channel(ours), tag, multiple)
    assert ours.written == reference.written
    assert ours.bytes_sent == 1


def test_writes_on_a_closed_connection_raise_what_kombu_reconnects_on() -> None:
    sink = _Sink()
    frames = _PublishFrames(_Channel(sink))
    frames.add("", "work", serialize_properties(Envelope(b"{}", "id-3"), {}), b"{}")
    sink.transport = None  # type: ignore[assignment]  # py-amqp's state once closed
    with pytest.raises(RecoverableConnectionError):
        frames.flush()
    closed = _Channel(sink)
    closed.connection = None  # type: ignore[assignment]
    with pytest.raises(RecoverableConnectionError):
        write_ack(closed, 1, False)
