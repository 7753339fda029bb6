"""The brokers of one ``python -m reliability`` invocation, and the runs on them.

A :class:`Harness` starts the brokers once, on first use, and always removes
them at the end. :meth:`Harness.run` sets up one scenario run
(:class:`~reliability.run.Run`) and tears it down when it ends.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import kombu
import redis

import mqtasks

from .brokers import RabbitNode, RedisServer, listening_beyond_loopback
from .profiles import (
    CLUSTER_PROFILES,
    POSTGRES_PROFILES,
    SENTINEL_PROFILES,
    BrokerProfile,
    Profile,
)
from .run import Run

__all__ = ["BrokerGroup", "Harness"]


class BrokerGroup(Protocol):
    """Several broker processes serving one profile family (a RabbitMQ cluster,
    Redis with Sentinels), made as ``cls(workdir)`` and started on first use."""

    #: The URL the workers and the publisher use (the password included).
    url: str
    #: The random password in :attr:`url`.
    password: str

    def start(self) -> float:
        """Start every process; return the seconds it took."""

    def stop(self) -> None:
        """Stop every process and remove their files."""

    def pids(self) -> list[int]:
        """Process ids of every broker process (for the loopback check)."""

    def version(self) -> str:
        """The broker's version."""

    def env(self, broker: BrokerProfile) -> dict[str, str]:
        """Extra environment of a run on ``broker`` (settings of the profile)."""


#: Broker groups by profile: ``module:Class``, imported on first use.
GROUPS: dict[str, str] = {
    **dict.fromkeys(CLUSTER_PROFILES, "reliability.rabbit_cluster:RabbitCluster"),
    **dict.fromkeys(SENTINEL_PROFILES, "reliability.redis_sentinel:SentinelGroup"),
    **dict.fromkeys(POSTGRES_PROFILES, "reliability.postgres_server:PostgresServer"),
}


class Harness:
    """Brokers of one invocation, started on first use and always cleaned up.

    Args:
        workdir: Where runs keep their ledgers and logs.
        profile: ci or release sizes.
        seed: Base seed; each run derives its own from it.
    """

    def __init__(self, workdir: Path, profile: Profile, seed: int) -> None:
        self.workdir = workdir
        self.profile = profile
        self.seed = seed
        self.rabbit: RabbitNode | None = None
        self.redis: dict[str, RedisServer] = {}
        self.groups: dict[str, BrokerGroup] = {}
        #: Runs between set-up and tear-down (their workers are stopped by close()).
        self._open_runs: set[Run] = set()
        self._versions: dict[str, str] = {}
        self.startup_s: dict[str, float] = {}

    # -- brokers --------------------------------------------------------------

    def rabbit_node(self) -> RabbitNode:
        """The harness's RabbitMQ node (started on first use; restarted if a scenario killed it)."""
        if self.rabbit is None:
            self.rabbit = RabbitNode(self.workdir / "rabbit")
            self.startup_s["rabbitmq"] = round(self.rabbit.start(), 1)
            self._versions["rabbitmq"] = self.rabbit.version()
        elif self.rabbit.beam_pid() is None:
            self.rabbit.restart()
        return self.rabbit

    def redis_server(self, profile: Literal["RD", "RV"]) -> RedisServer:
        """The harness's Redis server of ``profile`` (started on first use)."""
        server = self.redis.get(profile)
        if server is None:
            server = self.redis[profile] = RedisServer(profile, self.workdir / f"redis-{profile}")
            (self.workdir / f"redis-{profile}").mkdir(parents=True, exist_ok=True)
            self.startup_s[f"redis-{profile}"] = round(server.start(), 1)
            self._versions["redis"] = server.version()
        elif server.proc is None or server.proc.poll() is not None:
            server.restart()
        return server

    def group(self, broker: BrokerProfile) -> BrokerGroup:
        """The broker group serving ``broker`` (started on first use); see :data:`GROUPS`."""
        path = GROUPS[broker]
        group = self.groups.get(path)
        if group is None:
            module, _, name = path.partition(":")
            cls = getattr(importlib.import_module(module), name)
            group = self.groups[path] = cls(self.workdir / name.lower())
            self.startup_s[name] = round(group.start(), 1)
            self._versions[name] = group.version()
        return group

    def broker_env(self, broker: BrokerProfile) -> dict[str, str]:
        """Extra environment of a run on ``broker`` (a broker group's settings)."""
        return self.group(broker).env(broker) if broker in GROUPS else {}

    def broker_password(self, broker: BrokerProfile) -> str | None:
        """The random password in ``broker``'s URL (None for ``memory://``)."""
        if broker in GROUPS:
            return self.group(broker).password
        if broker in ("RQ", "RC"):
            return self.rabbit_node().password
        if broker in ("RD", "RV"):
            return self.redis_server(broker).password  # type: ignore[arg-type]
        return None

    def broker_url(self, broker: BrokerProfile) -> str:
        """URL of the broker behind ``broker``."""
        if broker in GROUPS:
            return self.group(broker).url
        if broker in ("RQ", "RC"):
            return self.rabbit_node().url
        return self.redis_server(broker).url  # type: ignore[arg-type]

    def loopback_violations(self) -> list[str]:
        """Listening sockets of the harness's brokers bound beyond 127.0.0.1."""
        pids: list[int] = []
        if self.rabbit is not None:
            pids += self.rabbit.pids()
        for server in self.redis.values():
            pids += server.pids()
        for group in self.groups.values():
            pids += group.pids()
        return listening_beyond_loopback(pids)

    def versions(self) -> dict[str, Any]:
        """Machine, broker and library versions for the result file."""
        import amqp

        return {
            "mqtasks": mqtasks.__version__,
            "kombu": kombu.__version__,
            "py-amqp": amqp.__version__,
            "redis-py": redis.__version__,
            "python": platform.python_version(),
            "nproc": os.cpu_count(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            **self._versions,
        }

    def close(self) -> None:
        """Stop the workers of runs still open (the other lane's, after Ctrl-C or
        SIGTERM), then every broker, and remove their files."""
        for run in list(self._open_runs):
            with contextlib.suppress(Exception):
                run.pool.stop(timeout=5)
        if self.rabbit is not None:
            self.rabbit.stop()
            self.rabbit = None
        for server in self.redis.values():
            server.stop()
        self.redis.clear()
        for group in self.groups.values():
            with contextlib.suppress(Exception):
                group.stop()
        self.groups.clear()

    # -- runs -----------------------------------------------------------------

    @contextlib.contextmanager
    def run(
        self,
        scenario: str,
        broker: BrokerProfile,
        *,
        workers: int = 2,
        concurrency: int = 1,
        prefetch: int = 4,
        shutdown_timeout: float = 30.0,
        early_ack: bool = False,
        delivery_limit: int | None = None,
        proxy: bool = False,
        restart: bool = True,
        queue_type: str | None = None,
        queue_options: dict[str, Any] | None = None,
    ) -> Iterator[Run]:
        """Set up one scenario run; tear it down (workers, proxy, queues) on exit.

        ``queue_options`` are extra :class:`~mqtasks.transport.QueueSpec` fields of
        the run's work queue (``max_length``, ``overflow``...), the same for the
        workers and the publisher.
        """
        seed = random.Random(f"{self.seed}-{scenario}-{broker}").randrange(2**31)
        run = Run(
            self,
            scenario,
            broker,
            seed=seed,
            workers=workers,
            concurrency=concurrency,
            prefetch=prefetch,
            shutdown_timeout=shutdown_timeout,
            early_ack=early_ack,
            delivery_limit=delivery_limit,
            proxy=proxy,
            restart=restart,
            queue_type=queue_type,
            queue_options=queue_options,
        )
        self._open_runs.add(run)
        try:
            yield run
        finally:
            run.close()
            self._open_runs.discard(run)
