"""Events: subscribers of order and user events, run by a worker in this process.

Run it with ``python examples/events.py``: it uses the in-process broker
(``memory://``), so it needs no server. With a real broker, set
``MQTASKS_BROKER_URL`` (``amqp://`` or ``redis://``), run ``mqtasks declare -A
examples.events`` once and a worker with ``mqtasks worker -A examples.events``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from mqtasks import App, Unroutable, current_event

app = App("shop", broker=os.environ.get("MQTASKS_BROKER_URL", "memory://"))

_print = threading.Lock()


def say(text: str) -> None:
    with _print:
        print(text)


@app.on("order.created")  # queue "shop.reserve_stock"
def reserve_stock(order: dict[str, Any]) -> None:
    say(f"stock: reserve {order['items']} for order {order['id']}")


@app.on("order.*", max_retries=5)  # queue "shop.email": created, paid, ...
def email(order: dict[str, Any]) -> None:
    say(f"email: order {order['id']} {current_event()}")


@app.on("user.#", queue="shop.audit")  # user.signed_up, user.address.changed, ...
def audit(payload: Any) -> None:
    say(f"audit: {current_event()} {payload}")


def main() -> None:
    from mqtasks.testing import drain, running_worker

    with running_worker(app) as worker:
        app.emit("order.created", {"id": 42, "items": 3})  # reserve_stock and email
        app.emit("order.paid", {"id": 42})  # email
        app.emit("user.signed_up", {"name": "ada"})  # audit
        drain(worker)
    app.emit("invoice.paid", {"id": 7}, mandatory=False)  # no subscriber: dropped
    try:
        app.emit("invoice.paid", {"id": 7})  # no subscriber: refused
    except Unroutable:
        say("invoice.paid: no subscriber is bound for it")


if __name__ == "__main__":
    main()
