"""A small shop app: run a worker with ``mqtasks worker -A examples.shop.app``.

The broker comes from ``MQTASKS_BROKER_URL`` (``memory://`` when unset, which
only works inside one process; use amqp:// or redis:// for a separate worker).
"""

from __future__ import annotations

import structlog

from mqtasks import App

app = App("shop")
log = structlog.get_logger("shop")


@app.task
def add(x: int, y: int) -> int:
    """Add two numbers (the hello-world task)."""
    return x + y


@app.task(name="shop.send_welcome", queue="emails", priority=5)
def send_welcome(user_id: int, *, language: str = "en") -> str:
    """Pretend to send a welcome e-mail; return what would be sent."""
    text = f"[{language}] Welcome, user {user_id}!"
    log.info("email.sent", user_id=user_id)
    return text
