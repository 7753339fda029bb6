"""The sizes (ci, release) and broker profiles (RQ, RC, RD, RV, MEM) a harness run can take.

A leaf module: the CLI, the harness and every scenario name these without
importing the machinery that uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["BROKER_PROFILES", "PROFILES", "BrokerProfile", "Profile"]

#: Broker profiles: RabbitMQ quorum (RQ) or classic (RC); Redis durable (RD) or
#: volatile (RV); MEM ``memory://`` in process (S15 only).
BrokerProfile = Literal["RQ", "RC", "RD", "RV", "MEM"]
BROKER_PROFILES: tuple[BrokerProfile, ...] = ("RQ", "RC", "RD", "RV", "MEM")


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
