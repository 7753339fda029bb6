"""Redis with Sentinel on loopback ports of its own: a primary, a replica and
three Sentinels, for the SR and SP profiles (and the Sentinel tests).

Both data nodes persist (``appendonly yes``, ``appendfsync always``), so what a
failover loses is what asynchronous replication had not yet carried, nothing
else. The Sentinels and the data nodes share one random password (in the URL
as the data nodes' password and as ``sentinel_password``). Faults (SIGKILL,
SIGSTOP) hit only the processes started here.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import redis

from .brokers import BrokerError, RedisServer, free_port, wait_port
from .profiles import BrokerProfile

__all__ = ["DataNode", "SentinelGroup"]

#: The name the Sentinels monitor the primary under.
SERVICE = "mymaster"


class DataNode(RedisServer):
    """One durable ``redis-server`` of the group (primary or replica, as the Sentinels
    decide), with the group's password also as the one it replicates with."""

    def __init__(self, base: Path, password: str) -> None:
        super().__init__("RD", base)
        self.password = password
        #: The port of the primary to replicate from at the next start (None: primary).
        self.replica_of: int | None = None

    def argv(self) -> list[str]:
        """The durable server's command line, replicating from :attr:`replica_of` if set."""
        follow = ["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else []
        return [*super().argv(), "--masterauth", self.password, *follow]

    def start_as(self, replica_of: int | None) -> None:
        """Start (again, on the same files) as a primary, or as a replica of port ``replica_of``."""
        self.replica_of = replica_of
        self.start()


class SentinelGroup:
    """A primary, a replica and three Sentinels (quorum 2) on loopback ports.

    Args:
        workdir: Where their files go (removed by :meth:`stop`).
        down_after_ms: Sentinel ``down-after-milliseconds``: how long the primary
            may be silent before a failover starts.
    """

    def __init__(self, workdir: Path, *, down_after_ms: int = 2000) -> None:
        self.workdir = workdir
        self.password = secrets.token_urlsafe(12)
        self.down_after_ms = down_after_ms
        self.nodes = [DataNode(workdir / f"node-{i}", self.password) for i in range(2)]
        taken = {n.port for n in self.nodes}
        self.sentinel_ports: list[int] = []
        while len(self.sentinel_ports) < 3:
            port = free_port()
            if port not in taken:
                taken.add(port)
                self.sentinel_ports.append(port)
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL (database 0), passwords included."""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return (
            f"redis+sentinel://:{self.password}@{hosts}/{SERVICE}/0"
            f"?sentinel_password={self.password}"
        )

    def start(self) -> float:
        """Start the data nodes, wait for the replica to sync, then the Sentinels;
        return the seconds it took."""
        t0 = time.monotonic()
        primary, replica = self.nodes
        primary.start_as(None)
        replica.start_as(primary.port)
        self.wait_synced(30)
        for i, port in enumerate(self.sentinel_ports):
            base = self.workdir / f"sentinel-{i}"
            base.mkdir(parents=True, exist_ok=True)
            conf = base / "sentinel.conf"
            conf.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {base}\n"
                f"logfile {base / 'sentinel.log'}\n"
                f"requirepass {self.password}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2\n"
                f"sentinel auth-pass {SERVICE} {self.password}\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            proc = subprocess.Popen(
                [shutil.which("redis-server") or "redis-server", str(conf), "--sentinel"],
                cwd=base,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.sentinels.append(proc)
            wait_port(port, 30, alive=proc)
        self._wait_sentinels_know_replica(30)
        return time.monotonic() - t0

    def sentinel_client(self, index: int = 0) -> redis.Redis[bytes]:
        """A client of one Sentinel."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.sentinel_ports[index],
            password=self.password,
            socket_timeout=2,
        )

    def primary_port(self) -> int | None:
        """The primary's port as a majority of the Sentinels report it (None: no majority)."""
        seen: dict[int, int] = {}
        for i in range(len(self.sentinel_ports)):
            with contextlib.suppress(redis.RedisError, OSError):
                addr = self.sentinel_client(i).execute_command(
                    "SENTINEL GET-MASTER-ADDR-BY-NAME", SERVICE
                )
                if addr:
                    seen[int(addr[1])] = seen.get(int(addr[1]), 0) + 1
        best = max(seen.items(), key=lambda kv: kv[1], default=None)
        return best[0] if best is not None and best[1] >= 2 else None

    def primary(self) -> DataNode:
        """The node the Sentinels name primary.

        Raises:
            BrokerError: They name none (a majority), or a port of no node here.
        """
        port = self.primary_port()
        for node in self.nodes:
            if node.port == port:
                return node
        raise BrokerError(f"the Sentinels name no primary of this group (port {port})")

    def other(self, node: DataNode) -> DataNode:
        """The data node that is not ``node``."""
        return self.nodes[1] if node is self.nodes[0] else self.nodes[0]

    def client(self) -> redis.Redis[bytes]:
        """A client of the current primary (for the harness's own reads)."""
        return self.primary().client()

    def wait_failover(self, old_port: int, timeout: float) -> float | None:
        """Wait until a majority of Sentinels name a primary other than ``old_port``
        that answers as one; return the seconds it took (None: not within ``timeout``)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            port = self.primary_port()
            if port is not None and port != old_port:
                with contextlib.suppress(redis.RedisError, OSError):
                    node = next(n for n in self.nodes if n.port == port)
                    if node.client().info("replication").get("role") == "master":
                        return time.monotonic() - t0
            time.sleep(0.1)
        return None

    def wait_synced(self, timeout: float) -> float | None:
        """Wait until the primary reports a replica online and caught up; return the
        seconds it took (None: not within ``timeout``)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with contextlib.suppress(redis.RedisError, OSError, BrokerError, StopIteration):
                node = self.primary() if self.sentinels else self.nodes[0]
                info = node.client().info("replication")
                offset = int(info.get("master_repl_offset", -1))
                replica = info.get("slave0")
                if (
                    isinstance(replica, dict)
                    and replica.get("state") == "online"
                    and int(replica.get("offset", -2)) >= offset - 1024 * 1024
                ):
                    return time.monotonic() - t0
            time.sleep(0.1)
        return None

    def _wait_sentinels_know_replica(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            known = 0
            for i in range(len(self.sentinel_ports)):
                with contextlib.suppress(redis.RedisError, OSError):
                    master = self.sentinel_client(i).execute_command("SENTINEL MASTER", SERVICE)
                    if (
                        int(master.get("num-slaves", 0)) >= 1
                        and int(master.get("num-other-sentinels", 0)) >= 2
                    ):
                        known += 1
            if known == len(self.sentinel_ports):
                return
            time.sleep(0.2)
        raise BrokerError("the Sentinels did not find the replica and each other in time")

    def restart(self, node: DataNode) -> float:
        """Start a killed node again as a replica of the current primary; return
        the seconds until the primary reports it in sync."""
        t0 = time.monotonic()
        node.start_as(self.primary().port)
        self.wait_synced(60)
        return time.monotonic() - t0

    def stop(self) -> None:
        """Stop the Sentinels and the data nodes, and remove their files."""
        for proc in self.sentinels:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.sentinels.clear()
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def pids(self) -> list[int]:
        """Process ids of the data nodes and the Sentinels that run."""
        procs = [n.proc for n in self.nodes] + list(self.sentinels)
        return [p.pid for p in procs if p is not None and p.poll() is None]

    def version(self) -> str:
        """The Redis version string."""
        for node in self.nodes:
            with contextlib.suppress(redis.RedisError, OSError):
                return str(node.client().info("server").get("redis_version", "unknown"))
        return "unknown"

    def env(self, broker: BrokerProfile) -> dict[str, str]:
        """SR publishes with ``durability="replicated"``; SP is the plain negative control."""
        return {"MQTASKS_DURABILITY": "replicated" if broker == "SR" else "local"}
