"""One consumer's prefetch bound split over its queues' RabbitMQ consumers.

RabbitMQ applies ``basic.qos`` with ``global=False`` to each consumer (each
``basic.consume``) on the channel: a consumer of three queues with a prefetch of
10 could hold 30 deliveries. ``global=True`` shares one window over the
channel, but quorum queues refuse a consumer on such a channel (``NOT_IMPLEMENTED
- does not support global qos``). So the bound is split: each queue's consumer
gets a share, and the shares add up to the bound.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["split_prefetch"]


def split_prefetch(prefetch: int, queues: Sequence[str]) -> dict[str, int]:
    """Return each queue's window: shares of ``prefetch`` as even as can be, in order.

    Every queue gets at least one delivery (a window of 0 would mean no limit
    to RabbitMQ), so with more queues than ``prefetch`` the total is the number
    of queues: the bound is ``max(prefetch, len(queues))``.
    """
    if not queues:
        return {}
    base, extra = divmod(prefetch, len(queues))
    return {name: max(1, base + (1 if i < extra else 0)) for i, name in enumerate(queues)}
