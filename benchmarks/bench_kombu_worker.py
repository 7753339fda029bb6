"""The plain-kombu worker of ``benchmarks.suite``: the floor any layer on kombu pays.

``python -m benchmarks.bench_kombu_worker``, configured by the environment (set by the
suite): ``BENCH_BROKER_URL``, ``BENCH_QUEUE``, ``BENCH_PREFETCH`` (16, as the mqtasks
worker), ``BENCH_KEYPREFIX`` (Redis ``global_keyprefix``).

One thread, one connection, a ``kombu.Consumer`` with manual acks: for each message it
parses the JSON body (``{"args": [seq, sent], "kwargs": {}}``, what mqtasks sends), runs
the same task body as the other systems, then acks. Quorum queue on RabbitMQ, as mqtasks.
Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from typing import Any

import kombu

from ._record import record


def queue_for(url: str, name: str) -> kombu.Queue:
    return kombu.Queue(
        name,
        exchange=kombu.Exchange(""),
        routing_key=name,
        durable=True,
        auto_delete=False,
        queue_arguments={"x-queue-type": "quorum"} if url.startswith("amqp") else None,
    )


def transport_options(url: str, keyprefix: str) -> dict[str, Any]:
    return {"global_keyprefix": keyprefix} if keyprefix and url.startswith("redis") else {}


def noop(seq: int, sent: float) -> None:
    record(seq, sent)


def main() -> int:
    url = os.environ["BENCH_BROKER_URL"]
    name = os.environ["BENCH_QUEUE"]
    prefetch = int(os.environ.get("BENCH_PREFETCH", "16"))
    options = transport_options(url, os.environ.get("BENCH_KEYPREFIX", ""))
    stopping = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def on_message(message: Any) -> None:
        payload = json.loads(message.body)
        noop(*payload["args"], **payload["kwargs"])
        message.ack()

    with kombu.Connection(url, connect_timeout=5, transport_options=options) as conn:
        conn.ensure_connection(max_retries=3)
        channel = conn.channel()
        queue = queue_for(url, name).bind(channel)
        queue.declare()
        consumer = kombu.Consumer(
            channel, queues=[queue], no_ack=False, auto_declare=False, on_message=on_message
        )
        consumer.qos(prefetch_count=prefetch)
        consumer.consume()
        while not stopping["flag"]:
            with contextlib.suppress(socket.timeout, TimeoutError):
                conn.drain_events(timeout=0.5)
        with contextlib.suppress(Exception):
            consumer.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
