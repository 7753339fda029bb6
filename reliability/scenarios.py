"""The registry of the protocol's negative controls N1-N3 and scenarios S0-S24.

Each scenario function takes the :class:`~reliability.harness.Harness` and a
broker profile and returns one JSON-able result per run, with its figures,
faults and pass checks. A scenario the harness does not implement (yet) is
reported as ``not_implemented``, never as passed.

The functions live in one module per family; this module only names them, and
no scenario module imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .batches import s21
from .bounded import s11
from .broker_faults import s3, s4, s5, s6
from .circuits import s20
from .cluster import s23
from .controls import n1, n2, n3
from .delays import s10, s10b, s10c
from .events import s17
from .harness import Harness
from .load import s0, s12
from .ordering import s18
from .parity import s15
from .periodic import s22
from .poison.scenario import s7
from .postgres_faults import s3_pg, s5_pg
from .profiles import BrokerProfile
from .retries import s8, s8b, s9
from .security.redaction import s14
from .security.tls import s13
from .sentinel import s24
from .timelimits import s19
from .worker_faults import s1, s2, s2b
from .workflows import s16

__all__ = ["SCENARIOS", "Scenario", "ScenarioFn"]

ScenarioFn = Callable[[Harness, BrokerProfile], dict[str, Any]]


@dataclass(frozen=True)
class Scenario:
    """A scenario and the broker profiles it runs on."""

    name: str
    title: str
    brokers: tuple[BrokerProfile, ...]
    fn: ScenarioFn | None
    #: Negative control: passes only if it shows loss.
    negative: bool = False


def _on_pg(generic: ScenarioFn, pg: ScenarioFn) -> ScenarioFn:
    """``generic`` on every profile but PG, where ``pg`` makes the faults PostgreSQL's way."""

    def run(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
        return (pg if broker == "PG" else generic)(h, broker)

    run.__doc__ = generic.__doc__
    return run


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("N1", "confirms off + kill -9 RabbitMQ", ("RC",), n1, negative=True),
        Scenario("N2", "Redis RV SHUTDOWN NOSAVE", ("RV",), n2, negative=True),
        Scenario("N3", "early ack + SIGKILL", ("RQ",), n3, negative=True),
        Scenario("S0", "baseline", ("RQ", "RC", "RD", "PG"), s0),
        Scenario("S1", "worker SIGKILL", ("RQ", "RD", "PG"), s1),
        Scenario("S2", "worker SIGTERM drain", ("RQ", "RD", "PG"), s2),
        Scenario("S2b", "task longer than the drain timeout", ("RQ", "RD", "PG"), s2b),
        Scenario("S3", "RabbitMQ (PG: PostgreSQL) restart", ("RQ", "RC", "PG"), _on_pg(s3, s3_pg)),
        Scenario("S4", "Redis restart", ("RD", "RV"), s4),
        Scenario("S5", "connection drops / black hole", ("RQ", "RD", "PG"), _on_pg(s5, s5_pg)),
        Scenario("S6", "broker freeze", ("RQ", "RD"), s6),
        Scenario("S7", "poison messages", ("RQ", "RC", "RD", "PG"), s7),
        Scenario("S8", "always-failing task", ("RQ", "RD"), s8),
        Scenario("S8b", "crash loop", ("RQ", "RD"), s8b),
        Scenario("S9", "retry storm", ("RQ", "RD"), s9),
        Scenario("S10", "TTL shorter than retries", ("RQ", "RD"), s10),
        Scenario("S10b", "countdowns longer than consumer_timeout", ("RQ",), s10b),
        Scenario("S10c", "Redis countdown longer than the liveness window", ("RD",), s10c),
        Scenario("S11", "slow consumer, bounded queue", ("RQ", "RC", "RD"), s11),
        Scenario("S12", "soak", ("RQ", "RD"), s12),
        Scenario("S13", "TLS", ("RQ", "RD"), s13),
        Scenario("S14", "credential redaction", ("RQ", "RD"), s14),
        Scenario("S15", "memory:// parity", ("MEM",), s15),
        Scenario("S16", "chords under worker SIGKILL", ("RQ", "RD", "PG"), s16),
        Scenario(
            "S17", "events to 3 subscriber groups through a worker SIGKILL", ("RQ", "RD"), s17
        ),
        Scenario(
            "S18",
            "ordered tasks by key through worker SIGKILLs and a connection cut",
            ("RQ", "RD"),
            s18,
        ),
        Scenario(
            "S19",
            "tasks past a 2 s hard time limit (endless loop, long sleep) through a worker SIGKILL",
            ("RQ", "RD", "PG"),
            s19,
        ),
        Scenario(
            "S20",
            "a dependency down 20 s (ci 8 s) mid-run behind a circuit breaker",
            ("RQ", "RD"),
            s20,
        ),
        Scenario(
            "S21",
            "10,000 batch items (batch_size 100), 1 % failing on purpose, through a worker SIGKILL",
            ("RQ", "RD", "PG"),
            s21,
        ),
        Scenario(
            "S22",
            "a tick a second from 3 beat processes, the leader SIGKILLed twice and frozen 15 s",
            ("RQ", "RD"),
            s22,
        ),
        Scenario(
            "S23",
            "RabbitMQ cluster: kill -9 of the queue leader, rolling restart, paused node",
            ("KQ", "KC"),
            s23,
        ),
        Scenario(
            "S24",
            "Redis Sentinel failover under load: SIGKILL, then a freeze of the primary",
            ("SR", "SP"),
            s24,
        ),
    ]
}
