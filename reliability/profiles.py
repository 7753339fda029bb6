"""The sizes (ci, release) and broker profiles a harness run can take.

A leaf module: the CLI, the harness and every scenario name these without
importing the machinery that uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "BROKER_PROFILES",
    "CLUSTER_PROFILES",
    "ON_REQUEST",
    "POSTGRES_PROFILES",
    "PROFILES",
    "RABBIT_PROFILES",
    "REDIS_PROFILES",
    "SENTINEL_PROFILES",
    "BrokerProfile",
    "Profile",
]

#: Broker profiles: RabbitMQ quorum (RQ) or classic (RC); Redis durable (RD) or
#: volatile (RV); MEM ``memory://`` in process (S15 only). Beyond one node: a
#: 3-node RabbitMQ cluster with quorum (KQ) or classic (KC, the negative control)
#: queues; Redis with a replica and three Sentinels, with ``delay()`` waiting for
#: the replica (SR) or not (SP, the negative control). PG: the ``postgresql://``
#: broker on a PostgreSQL server of the harness's own.
BrokerProfile = Literal["RQ", "RC", "RD", "RV", "MEM", "KQ", "KC", "SR", "SP", "PG"]
BROKER_PROFILES: tuple[BrokerProfile, ...] = (
    "RQ",
    "RC",
    "RD",
    "RV",
    "MEM",
    "KQ",
    "KC",
    "SR",
    "SP",
    "PG",
)
#: The RabbitMQ cluster profiles.
CLUSTER_PROFILES: frozenset[str] = frozenset({"KQ", "KC"})
#: The Redis Sentinel profiles.
SENTINEL_PROFILES: frozenset[str] = frozenset({"SR", "SP"})
#: Profiles served by PostgreSQL (the ``postgresql://`` broker).
POSTGRES_PROFILES: frozenset[str] = frozenset({"PG"})
#: Profiles served by RabbitMQ (one node or a cluster).
RABBIT_PROFILES: frozenset[str] = frozenset({"RQ", "RC"}) | CLUSTER_PROFILES
#: Profiles served by Redis (one server or a Sentinel group).
REDIS_PROFILES: frozenset[str] = frozenset({"RD", "RV"}) | SENTINEL_PROFILES
#: Profiles a run includes only when ``--broker`` names them (or ``cluster``,
#: ``sentinel``): each starts several broker processes of its own, too heavy for
#: every ci run. PG until its S5 criteria pass (docs/reliability.md).
ON_REQUEST: frozenset[str] = CLUSTER_PROFILES | SENTINEL_PROFILES | POSTGRES_PROFILES


@dataclass(frozen=True)
class Profile:
    """Sizes of one harness profile."""

    name: str
    #: Multiplies the protocol's task counts (ci: 0.1).
    scale: float
    #: Seconds of the soak scenario.
    soak_s: float
    #: Quiet seconds that make a run quiescent.
    quiet_s: float = 10.0

    def n(self, count: int, minimum: int = 1) -> int:
        """``count`` scaled for this profile (at least ``minimum``)."""
        return max(minimum, round(count * self.scale))


#: ci waits 5 quiet seconds, release 10: quiescence also needs empty ready,
#: delayed and unacked counts (a dead Redis consumer's messages count as unacked
#: until a sweep restores them), so the quiet time only covers what is in transit.
PROFILES = {
    "ci": Profile("ci", 0.1, 60.0, quiet_s=5.0),
    "release": Profile("release", 1.0, 600.0),
}
