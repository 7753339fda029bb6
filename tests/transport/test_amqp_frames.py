"""The RabbitMQ consumer reads what its socket holds at once and splits the AMQP frames itself."""

from __future__ import annotations

import struct
import threading

import pytest
from amqp.exceptions import UnexpectedFrame

from mqtasks import App
from mqtasks.testing import drain, running_worker
from mqtasks.transport.amqp.wire import split_frames


def frame(frame_type: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + bytes([end])


def test_a_frame_without_its_end_octet_is_unexpected() -> None:
    got: list[tuple[int, int, bytes]] = []
    data = frame(1, 1, b"good") + frame(3, 1, b"bad", end=0x00) + frame(3, 1, b"never")
    with pytest.raises(UnexpectedFrame, match="0x00"):
        split_frames(data, got.append)
    assert got == [(1, 1, b"good")]  # what came before the broken frame was handed over


def test_complete_frames_are_handed_over_in_order_and_the_rest_is_returned() -> None:
    got: list[tuple[int, int, bytes]] = []
    whole = frame(1, 1, b"method") + frame(2, 1, b"header") + frame(3, 1, b"") + frame(8, 0, b"")
    partial = frame(3, 2, b"body")[:-1]  # all but its end octet
    assert split_frames(whole + partial, got.append) == partial
    assert got == [(1, 1, b"method"), (2, 1, b"header"), (3, 1, b""), (8, 0, b"")]


@pytest.mark.parametrize("step", [1, 5, 7, 8, 100])
def test_frames_arriving_in_pieces_are_put_together(step: int) -> None:
    frames = [(1, 1, b"x" * 50), (2, 1, b""), (3, 1, b"y" * 300), (8, 0, b"")]
    stream = b"".join(frame(*f) for f in frames)
    got: list[tuple[int, int, bytes]] = []
    rest = b""
    for i in range(0, len(stream), step):
        rest = split_frames(rest + stream[i : i + step], got.append)
    assert got == frames
    assert rest == b""


def test_nothing_is_handed_over_until_a_frame_is_complete() -> None:
    got: list[tuple[int, int, bytes]] = []
    data = frame(1, 1, b"abc")
    for cut in range(len(data)):
        assert split_frames(data[:cut], got.append) == data[:cut]
    assert got == []


@pytest.mark.integration
def test_large_and_small_messages_arrive_intact_across_reads(amqp_url: str, make_app) -> None:
    """Bodies larger than a read and than the broker's frame size, between many small ones."""
    app: App = make_app(amqp_url)
    seen: dict[int, str] = {}
    lock = threading.Lock()

    @app.task
    def keep(n: int, text: str) -> None:
        with lock:
            seen[n] = text

    sent = {n: (chr(65 + n % 26) * (700_000 if n % 10 == 3 else n)) for n in range(60)}
    keep.starmap(sent.items())
    with running_worker(app, concurrency=4) as worker:
        drain(worker, timeout=60)
    assert seen == sent
