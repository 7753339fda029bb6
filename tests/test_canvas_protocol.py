"""The body's ``workflow`` member on the wire: encoded, decoded strictly, refused when malformed."""

from __future__ import annotations

import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from mqtasks import App, DecodeError, EncodeError, Message
from mqtasks.middleware.workflow import Workflow
from mqtasks.serialization import decode_body, decode_call, encode_body
from mqtasks.testing import drain, running_worker
from mqtasks.transport.envelope import Envelope
from mqtasks.transport.kombu_consumer import KombuDelivery

LIMIT = 1024 * 1024
JSON = "application/json"


def _decode(body: bytes) -> tuple[list[Any], dict[str, Any], dict[str, Any] | None]:
    return decode_call(body, content_type=JSON, content_encoding="utf-8", max_size=LIMIT)


def test_workflow_member_is_decoded_and_absent_means_none() -> None:
    assert _decode(b'{"args":[1],"kwargs":{}}') == ([1], {}, None)
    body = b'{"args":[1],"kwargs":{},"workflow":{"dedupe":true}}'
    assert _decode(body) == ([1], {}, {"dedupe": True})
    assert decode_body(body, content_type=JSON, content_encoding="utf-8", max_size=LIMIT) == (
        [1],
        {},
    )


@pytest.mark.parametrize("value", ["[]", "null", '"chain"', "1", "true"])
def test_workflow_that_is_not_an_object_is_refused(value: str) -> None:
    body = b'{"args":[],"kwargs":{},"workflow":' + value.encode() + b"}"
    with pytest.raises(DecodeError) as refused:
        _decode(body)
    assert refused.value.reason == "decode_error"
    assert "'workflow' is not a JSON object" in refused.value.detail


def test_body_with_an_unknown_member_is_refused_naming_it() -> None:
    with pytest.raises(DecodeError) as refused:
        _decode(b'{"args":[],"kwargs":{},"callbacks":[1]}')
    assert refused.value.reason == "decode_error"
    assert "['callbacks']" in refused.value.detail


def test_encode_puts_the_workflow_in_the_body_only_when_there_is_one() -> None:
    assert encode_body((1,), {}, max_size=LIMIT) == b'{"args":[1],"kwargs":{}}'
    body = encode_body((1,), {}, max_size=LIMIT, workflow={"dedupe": True})
    assert json.loads(body) == {"args": [1], "kwargs": {}, "workflow": {"dedupe": True}}
    with pytest.raises(EncodeError, match=r"workflow of task 't\.add' cannot be sent as JSON"):
        encode_body((1,), {}, max_size=LIMIT, task="t.add", workflow={"x": object()})


def test_message_workflow_round_trips_through_a_delivery() -> None:
    workflow = {"chain": [{"task": "t.add", "args": [3], "id": "step-2"}]}
    message = Message(id="step-1", task="t.add", queue="work", args=(1, 2), workflow=workflow)
    env = message.encode(max_size=LIMIT)
    raw = SimpleNamespace(
        body=env.body,
        headers=env.headers,
        properties={"message_id": env.message_id},
        content_type=env.content_type,
        content_encoding=env.content_encoding,
        delivery_info={"redelivered": False},
        mqtasks_refused=None,
    )
    received = Message.from_delivery(KombuDelivery(raw, "work", 1), max_size=LIMIT)  # type: ignore[arg-type]
    assert received.workflow == workflow
    assert received.args == (1, 2)
    assert message.copy(workflow=None).encode(max_size=LIMIT).body == b'{"args":[1,2],"kwargs":{}}'


def _inject(app: App, queue: str, task: str, body: bytes, message_id: str) -> None:
    app.declare([queue])
    headers = {"mqtasks-task": task, "mqtasks-attempt": 1}
    envelope = Envelope(
        body=body,
        message_id=message_id,
        headers=headers,
        content_type=JSON,
        content_encoding="utf-8",
    )
    app.transport.publish(queue, envelope)


def test_worker_dead_letters_a_body_with_an_unknown_member_unrun(
    make_app: Callable[..., App],
) -> None:
    app = make_app("memory://", backend="memory://")
    ran: list[int] = []

    @app.task(name="p.add")
    def add(x: int, y: int) -> int:
        ran.append(x + y)
        return x + y

    with running_worker(app) as worker:
        _inject(app, add.queue, add.name, b'{"args":[1,2],"kwargs":{},"then":[]}', "odd-member")
        _inject(app, add.queue, add.name, b'{"args":[1,2],"kwargs":{},"workflow":[]}', "odd-wf")
        add.delay(2, 2)
        drain(worker, raise_errors=False)
    assert ran == [4]
    assert sorted((e.id, e.reason) for e in app.dead_letters(add.queue)) == [
        ("odd-member", "decode_error"),
        ("odd-wf", "decode_error"),
    ]


def test_malformed_workflow_runs_the_task_and_continues_nothing(
    make_app: Callable[..., App],
) -> None:
    app = make_app("memory://", backend="memory://")
    app.middleware.append(Workflow())
    ran: list[int] = []

    @app.task(name="p.add")
    def add(x: int, y: int) -> int:
        ran.append(x + y)
        return x + y

    body = b'{"args":[1,2],"kwargs":{},"workflow":{"chain":[{"task":7}]}}'
    with running_worker(app) as worker:
        _inject(app, add.queue, add.name, body, "bad-chain")
        assert app.handle("bad-chain").get(timeout=10) == 3
        drain(worker)
    assert ran == [3]
    assert app.dead_letters(add.queue) == []
