"""A worker for the negative control N3: acknowledges every message on receipt.

``python -m reliability.worker --early-ack`` runs the harness app like
``mqtasks worker -A reliability.tasks``, except that each message is acked the
moment it arrives, before its task runs (at-most-once, as Celery's default
``acks_late=False``). A SIGKILL then loses every message the process held: the
harness must see ``lost > 0``, or it cannot see loss at all. Test-only, and kept
out of mqtasks on purpose: it wraps the transport's consumer from the outside.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from mqtasks import Worker
from mqtasks.cli import configure_logging
from mqtasks.process import StopSignals, run_worker
from mqtasks.transport import Consumer, Delivery, QueueSpec, Transport

__all__ = ["EarlyAckConsumer", "install_early_ack", "main"]


class EarlyAckConsumer:
    """Delegates to a real consumer, but acks each delivery before handing it on.

    The worker's own ack, reject or requeue of such a delivery later is dropped:
    the broker forgot the message already.
    """

    def __init__(self, inner: Consumer) -> None:
        self._inner = inner
        self._acked: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        """Start the real consumer with an ack-first callback."""

        def ack_first(delivery: Delivery) -> None:
            self._inner.ack(delivery)
            self._acked.add(id(delivery))
            on_delivery(delivery)

        self._inner.start(ack_first)

    def _forget(self, delivery: Delivery) -> bool:
        try:
            self._acked.remove(id(delivery))
        except KeyError:
            return False
        return True

    def ack(self, delivery: Delivery) -> bool:
        """Ack unless it was acked on receipt."""
        return True if self._forget(delivery) else bool(self._inner.ack(delivery))

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack those not acked on receipt."""
        rest = [d for d in deliveries if not self._forget(d)]
        if rest:
            self._inner.ack_many(rest)

    def reject(self, delivery: Delivery) -> bool:
        """Reject unless it was acked on receipt (then it is gone already)."""
        return True if self._forget(delivery) else bool(self._inner.reject(delivery))

    def requeue(self, delivery: Delivery) -> bool:
        """Requeue unless it was acked on receipt (then it is gone already)."""
        return True if self._forget(delivery) else bool(self._inner.requeue(delivery))


def install_early_ack(transport: Transport) -> None:
    """Make every consumer ``transport`` creates from now on ack on receipt."""
    make = transport.consumer

    def consumer(specs: Sequence[QueueSpec], *, prefetch: int) -> Consumer:
        return EarlyAckConsumer(make(specs, prefetch=prefetch))  # type: ignore[return-value]

    transport.consumer = consumer  # type: ignore[method-assign]


@click.command()
@click.option("--early-ack", is_flag=True, help="Ack on receipt, before the task runs (N3).")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--prefetch", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True)
def main(early_ack: bool, concurrency: int, prefetch: int, shutdown_timeout: float) -> None:
    """Run the harness app's worker (optionally in early-ack mode) until SIGTERM."""
    configure_logging("info", "json")
    signals = StopSignals()  # before the app loads, as ``mqtasks worker`` does
    from .tasks import app

    if early_ack:
        install_early_ack(app.transport)
    w = Worker(app, concurrency=concurrency, prefetch=prefetch, shutdown_timeout=shutdown_timeout)
    sys.exit(run_worker(w, signals))


if __name__ == "__main__":  # pragma: no cover
    main()
